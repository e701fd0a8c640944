"""The VinDr-SpineXR data set as distributed: ``annotations/{train,test}.csv`` and
``{train,test}_images/<image_id>.dicom``.

One CSV row per (image, radiologist, box); a normal image has a row with lesion type
"No finding" and empty coordinates. An image is abnormal when any row names a lesion; its boxes
are every lesion row (all radiologists'), exact duplicates dropped.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path

from workers.bundle import VINDR_CLASSES

COLUMNS = ("study_id", "series_id", "image_id", "rad_id", "lesion_type", "xmin", "ymin", "xmax",
           "ymax")
NO_FINDING = "No finding"
SPLITS = ("train", "test")


class DatasetError(ValueError):
    """The data set cannot be read as VinDr-SpineXR; the message is one line."""


@dataclass(frozen=True)
class Box:
    class_name: str
    x0: float
    y0: float
    x1: float
    y1: float
    rad_id: str = ""

    @property
    def class_index(self) -> int:
        return VINDR_CLASSES.index(self.class_name)


@dataclass
class ImageRecord:
    image_id: str
    study_id: str
    series_id: str
    split: str
    path: Path
    boxes: list[Box] = field(default_factory=list)
    rad_ids: set[str] = field(default_factory=set)

    @property
    def abnormal(self) -> bool:
        return bool(self.boxes)


def csv_path(root: Path, split: str) -> Path:
    return root / "annotations" / f"{split}.csv"


def image_path(root: Path, split: str, image_id: str) -> Path:
    return root / f"{split}_images" / f"{image_id}.dicom"


def _float(value: str, where: str) -> float:
    try:
        return float(value)
    except ValueError:
        raise DatasetError(f"{where}: {value!r} is not a number") from None


def read_split(root: Path, split: str, check_files: bool = True) -> list[ImageRecord]:
    """Every image of one split, in the order the CSV first names them."""
    if split not in SPLITS:
        raise DatasetError(f"unknown split {split!r}; VinDr-SpineXR has {', '.join(SPLITS)}")
    path = csv_path(root, split)
    if not path.is_file():
        raise DatasetError(f"{path} not found: is {root} a VinDr-SpineXR folder?")
    records: dict[str, ImageRecord] = {}
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        missing = [column for column in COLUMNS if column not in (reader.fieldnames or [])]
        if missing:
            raise DatasetError(f"{path}: missing column(s) {', '.join(missing)}")
        for line, row in enumerate(reader, start=2):
            where = f"{path}:{line}"
            image_id = row["image_id"].strip()
            if not image_id:
                raise DatasetError(f"{where}: empty image_id")
            record = records.setdefault(image_id, ImageRecord(
                image_id, row["study_id"].strip(), row["series_id"].strip(), split,
                image_path(root, split, image_id)))
            record.rad_ids.add(row["rad_id"].strip())
            lesion = row["lesion_type"].strip()
            if lesion == NO_FINDING:
                continue
            if lesion not in VINDR_CLASSES:
                raise DatasetError(f"{where}: unknown lesion type {lesion!r}")
            box = Box(lesion, *(_float(row[c], where) for c in ("xmin", "ymin", "xmax", "ymax")),
                      rad_id=row["rad_id"].strip())
            if box.x1 <= box.x0 or box.y1 <= box.y0:
                raise DatasetError(f"{where}: empty box {box.x0},{box.y0},{box.x1},{box.y1}")
            same = [b for b in record.boxes if (b.class_name, b.x0, b.y0, b.x1, b.y1)
                    == (box.class_name, box.x0, box.y0, box.x1, box.y1)]
            if not same:
                record.boxes.append(box)
    if check_files:
        absent = [r.image_id for r in records.values() if not r.path.is_file()]
        if absent:
            raise DatasetError(f"{len(absent)} image(s) of {split} missing, e.g. "
                               f"{image_path(root, split, absent[0])}")
    return list(records.values())
