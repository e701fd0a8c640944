"""Synthetic spine radiograph phantoms, written in exactly VinDr-SpineXR's layout (DICOM + CSV).

Each image: soft tissue, a column of vertebral bodies with discs between them, noise. About half
the images are normal; the others carry 1-3 lesions drawn with a distinct visual sign each, with
class frequencies following the paper's imbalance:

- Osteophytes: a bright spur at a vertebral corner
- Surgical implant: a metal-bright rod with screw heads across two or three vertebrae
- Spondylolysthesis: a vertebra slipped sideways over the one below
- Foraminal stenosis: a bright bony overgrowth beside a disc
- Disc space narrowing: a disc much thinner than its neighbours, between sclerotic (bright)
  end plates
- Vertebral collapse: a vertebra of about half the normal height
- Other lesions: a dark round lytic spot inside a vertebra

The signs are sized to stay visible at the demo's reduced resolutions (96 px classifier, 192 px
detector). Deterministic by seed; image size and counts are parameters.

One look flatters a recipe, so ``generate(variety=True)`` draws each image's conditions: a
difficulty band (easy, medium, hard: lesion contrast, lesion size, noise, exposure), and, across
all bands, the image size (300 to 3,000 px by default), the number of vertebral levels, the
column's position and both photometric interpretations. Each split's conditions go to
``annotations/<split>_conditions.csv`` so that an evaluation can report quality per band.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.uid import (
    ComputedRadiographyImageStorage,
    JPEG2000Lossless,
    generate_uid,
)

from training.synthetic import grey_image
from training.vindr import COLUMNS, NO_FINDING, csv_path, image_path
from workers.bundle import VINDR_CLASSES

# Relative lesion frequencies (VinDr-SpineXR's training boxes, rounded): osteophytes dominate,
# other lesions are rare.
CLASS_FREQUENCIES = {
    "Osteophytes": 0.45,
    "Disc space narrowing": 0.17,
    "Surgical implant": 0.12,
    "Foraminal stenosis": 0.10,
    "Spondylolysthesis": 0.07,
    "Vertebral collapse": 0.06,
    "Other lesions": 0.03,
}
BITS = 12
TOP = 2**BITS - 1


@dataclass(frozen=True)
class Conditions:
    """How one phantom is drawn. The defaults are the one look of the plain generator."""

    band: str = "plain"
    levels: int = 5  # vertebrae in view
    lesion_scale: float = 1.0  # lesion size against the plain look's
    contrast: float = 1.0  # a lesion's difference from the bone it sits on, against the plain's
    noise: float = 0.015  # standard deviation, image in [0, 1]
    gamma: float = 1.0  # exposure: the image is raised to this power
    column_offset: float = 0.0  # the spine's centre off the image's, in widths
    unit: float = 1.0  # pixels per fixed-size detail (cortex, end plates, box margins)


# Per band: (lesion_scale, contrast, noise, gamma) ranges, drawn uniformly.
BANDS = {
    "easy": ((0.9, 1.2), (0.9, 1.0), (0.008, 0.02), (0.9, 1.1)),
    "medium": ((0.65, 0.9), (0.55, 0.85), (0.02, 0.04), (0.75, 1.35)),
    "hard": ((0.45, 0.65), (0.3, 0.55), (0.04, 0.07), (0.6, 1.7)),
}
CONDITION_COLUMNS = ["image_id", "band", "rows", "columns", "levels", "lesion_scale", "contrast",
                     "noise", "gamma", "photometric"]


def draw_conditions(rng: np.random.Generator, sizes: tuple[int, int]
                    ) -> tuple[Conditions, int, int]:
    """(conditions, rows, columns) of one varied phantom: a band, then its ranges."""
    band = str(rng.choice(list(BANDS)))
    scale, contrast, noise, gamma = (rng.uniform(*limits) for limits in BANDS[band])
    rows = int(round(np.exp(rng.uniform(np.log(sizes[0]), np.log(sizes[1])))))
    columns = int(round(rows * rng.uniform(0.6, 0.85)))
    conditions = Conditions(band=band, levels=int(rng.integers(4, 8)), lesion_scale=scale,
                            contrast=contrast, noise=noise, gamma=gamma,
                            column_offset=rng.uniform(-0.12, 0.12), unit=max(1.0, rows / 384))
    return conditions, rows, columns


@dataclass
class Vertebra:
    x0: float
    y0: float
    x1: float
    y1: float


@dataclass(frozen=True)
class PhantomBox:
    class_name: str
    x0: float
    y0: float
    x1: float
    y1: float


def _fill_rect(image: np.ndarray, x0: float, y0: float, x1: float, y1: float,
               value: float) -> None:
    h, w = image.shape
    r0, r1 = int(max(0, round(y0))), int(min(h, round(y1)))
    c0, c1 = int(max(0, round(x0))), int(min(w, round(x1)))
    image[r0:r1, c0:c1] = value


def _disc(image: np.ndarray, cx: float, cy: float, radius: float, value: float) -> None:
    h, w = image.shape
    y, x = np.ogrid[:h, :w]
    image[(x - cx) ** 2 + (y - cy) ** 2 <= radius**2] = value


def _clip_box(box: PhantomBox, width: int, height: int) -> PhantomBox:
    return PhantomBox(box.class_name, max(0.0, box.x0), max(0.0, box.y0),
                      min(float(width), box.x1), min(float(height), box.y1))


def draw_phantom(rng: np.random.Generator, height: int, width: int, lesions: list[str],
                 conditions: Conditions = Conditions()) -> tuple[np.ndarray, list[PhantomBox]]:
    """A [0, 1] image (bright bone) and the boxes of the lesions drawn on it."""
    c = conditions
    u = c.unit
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    centre = width / 2 + (rng.uniform(-0.05, 0.05) + c.column_offset) * width
    image = 0.15 + 0.25 * np.exp(-(((x - centre) / (width * 0.3)) ** 2))
    count = c.levels

    def sign(value: float, bone: float = 0.72) -> float:
        """A lesion's grey value at this image's contrast: its difference from bone, scaled."""
        return bone + c.contrast * (value - bone)
    body_h = height * 0.8 / (count * 1.35)
    gap = body_h * 0.35
    body_w = width * rng.uniform(0.2, 0.26)
    top = height * 0.1
    vertebrae = []
    for index in range(count):
        y0 = top + index * (body_h + gap)
        vertebrae.append(Vertebra(centre - body_w / 2, y0, centre + body_w / 2, y0 + body_h))
    boxes: list[PhantomBox] = []
    narrowed: set[int] = set()  # vertebrae whose disc below is narrowed
    # Geometric lesions first: they move or reshape the vertebrae before drawing.
    for lesion in lesions:
        k = int(rng.integers(1, count - 1))
        v, below = vertebrae[k], vertebrae[k + 1]
        if lesion == "Spondylolysthesis":
            shift = body_w * rng.uniform(0.2, 0.3) * c.lesion_scale * rng.choice([-1, 1])
            v.x0 += shift
            v.x1 += shift
            boxes.append(PhantomBox(lesion, min(v.x0, below.x0), v.y0, max(v.x1, below.x1),
                                    below.y1))
        elif lesion == "Vertebral collapse":
            v.y0 = v.y1 - body_h * (1 - (1 - rng.uniform(0.4, 0.55)) * min(1.0, c.lesion_scale))
            boxes.append(PhantomBox(lesion, v.x0, v.y0, v.x1, v.y1))
        elif lesion == "Disc space narrowing":
            below.y0 = v.y1 + gap * (1 - (1 - rng.uniform(0.0, 0.15)) * min(1.0, c.lesion_scale))
            narrowed.add(k)
            boxes.append(PhantomBox(lesion, v.x0, v.y1 - body_h * 0.15, v.x1,
                                    below.y0 + body_h * 0.15))
    for v in vertebrae:
        _fill_rect(image, v.x0, v.y0, v.x1, v.y1, 0.72)
        _fill_rect(image, v.x0 + 3 * u, v.y0 + 3 * u, v.x1 - 3 * u, v.y1 - 3 * u,
                   0.62)  # cortex brighter
    for k in narrowed:  # sclerotic end plates either side of a narrowed disc
        _fill_rect(image, vertebrae[k].x0, vertebrae[k].y1 - 4 * u, vertebrae[k].x1,
                   vertebrae[k].y1, sign(0.9))
        _fill_rect(image, vertebrae[k + 1].x0, vertebrae[k + 1].y0, vertebrae[k + 1].x1,
                   vertebrae[k + 1].y0 + 4 * u, sign(0.9))
    for lesion in lesions:
        k = int(rng.integers(0, count))
        v = vertebrae[k]
        if lesion == "Osteophytes":
            side = rng.choice([-1, 1])
            edge = v.x0 if side < 0 else v.x1
            corner = v.y0 if rng.random() < 0.5 else v.y1
            size = body_w * rng.uniform(0.25, 0.35) * c.lesion_scale
            for step in range(int(size)):  # a triangle pointing outwards
                half = (size - step) * 0.5
                _fill_rect(image, edge + side * step - 1, corner - half, edge + side * step + 1,
                           corner + half, sign(0.85))
            x_lo, x_hi = sorted((edge, edge + side * size))
            m = 2 * u
            boxes.append(PhantomBox(lesion, x_lo - m, corner - size / 2 - m, x_hi + m,
                                    corner + size / 2 + m))
        elif lesion == "Surgical implant":
            span = int(rng.integers(2, 4))
            first = vertebrae[min(k, count - span)]
            last = vertebrae[min(k, count - span) + span - 1]
            rod_x = first.x0 + (first.x1 - first.x0) * rng.uniform(0.25, 0.75)
            rod_w = body_w * 0.06 * c.lesion_scale
            _fill_rect(image, rod_x - rod_w, first.y0, rod_x + rod_w, last.y1, sign(1.0))
            for vv in vertebrae[vertebrae.index(first):vertebrae.index(last) + 1]:
                cy = (vv.y0 + vv.y1) / 2
                _fill_rect(image, rod_x - rod_w * 4, cy - rod_w, rod_x + rod_w * 4, cy + rod_w,
                           sign(1.0))
            m = 2 * u
            boxes.append(PhantomBox(lesion, rod_x - rod_w * 4 - m, first.y0 - m,
                                    rod_x + rod_w * 4 + m, last.y1 + m))
        elif lesion == "Foraminal stenosis":
            k = min(k, count - 2)
            cy = (vertebrae[k].y1 + vertebrae[k + 1].y0) / 2
            cx = vertebrae[k].x1 + body_w * 0.15
            radius = gap * rng.uniform(0.6, 0.9) * c.lesion_scale
            _disc(image, cx, cy, radius, sign(0.8, bone=0.3))
            m = 2 * u
            boxes.append(PhantomBox(lesion, cx - radius - m, cy - radius - m, cx + radius + m,
                                    cy + radius + m))
        elif lesion == "Other lesions":
            cx, cy = (v.x0 + v.x1) / 2, (v.y0 + v.y1) / 2
            radius = min(v.x1 - v.x0, v.y1 - v.y0) * rng.uniform(0.25, 0.35) * c.lesion_scale
            _disc(image, cx, cy, radius, sign(0.1, bone=0.62))
            m = 2 * u
            boxes.append(PhantomBox(lesion, cx - radius - m, cy - radius - m, cx + radius + m,
                                    cy + radius + m))
    image = image + rng.normal(0, c.noise, image.shape)
    image = np.clip(image, 0, 1) ** c.gamma
    return image.astype(np.float32), [_clip_box(b, width, height) for b in boxes]


def _uid(seed: int, *parts: object) -> str:
    return generate_uid(entropy_srcs=["spinenode-phantom", str(seed), *map(str, parts)])


def write_dicom(path: Path, image: np.ndarray, ids: tuple[str, str, str], monochrome1: bool,
                compress: bool, seed: int) -> None:
    study_id, series_id, image_id = ids
    stored = np.round((1 - image if monochrome1 else image) * TOP).astype(np.uint16)
    # Like VinDr: CR, no Modality tag, nothing but the patient and the pixels.
    ds = grey_image(stored, BITS, "MONOCHROME1" if monochrome1 else "MONOCHROME2",
                    ComputedRadiographyImageStorage, sop_instance_uid=_uid(seed, image_id),
                    study_uid=_uid(seed, study_id), series_uid=_uid(seed, series_id))
    ds.PatientID = f"PHANTOM-{study_id[:8]}"
    ds.PatientName = "Phantom^Spine"
    if compress:
        ds.compress(JPEG2000Lossless)  # VinDr's own transfer syntax
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)


def generate(root: Path, *, train: int = 40, test: int = 20, height: int = 512,
             width: int = 384, seed: int = 0, normal_fraction: float = 0.5,
             compress: bool = False, variety: bool = False,
             sizes: tuple[int, int] = (300, 3000)) -> Path:
    """Write a phantom data set in VinDr-SpineXR's layout under ``root``: each image
    ``height`` x ``width`` in the plain look, or with ``variety`` in conditions drawn per image
    (its long side log-uniform within ``sizes``; see the module's note)."""
    rng = np.random.default_rng(seed)
    classes = list(CLASS_FREQUENCIES)
    weights = np.array(list(CLASS_FREQUENCIES.values()))
    weights /= weights.sum()
    assert set(classes) == set(VINDR_CLASSES)
    for split, count in (("train", train), ("test", test)):
        rows, drawn = [], []
        for index in range(count):
            ids = tuple(f"{part}{rng.integers(0, 2**48):012x}" for part in ("st", "se", "im"))
            abnormal = rng.random() >= normal_fraction
            lesions = ([str(c) for c in rng.choice(classes, size=int(rng.integers(1, 4)),
                                                   p=weights)] if abnormal else [])
            conditions, rows_, columns = (draw_conditions(rng, sizes) if variety
                                          else (Conditions(), height, width))
            image, boxes = draw_phantom(rng, rows_, columns, lesions, conditions)
            monochrome1 = bool(rng.random() < 0.5)
            write_dicom(image_path(root, split, ids[2]), image, ids, monochrome1=monochrome1,
                        compress=compress, seed=seed)
            drawn.append({"image_id": ids[2], "band": conditions.band, "rows": rows_,
                          "columns": columns, "levels": conditions.levels,
                          "lesion_scale": f"{conditions.lesion_scale:.3f}",
                          "contrast": f"{conditions.contrast:.3f}",
                          "noise": f"{conditions.noise:.4f}", "gamma": f"{conditions.gamma:.3f}",
                          "photometric": "MONOCHROME1" if monochrome1 else "MONOCHROME2"})
            base = {"study_id": ids[0], "series_id": ids[1], "image_id": ids[2],
                    "rad_id": f"R{index % 3 + 1}"}
            if not boxes:
                rows.append({**base, "lesion_type": NO_FINDING, "xmin": "", "ymin": "",
                             "xmax": "", "ymax": ""})
            rows += [{**base, "lesion_type": b.class_name, "xmin": f"{b.x0:.1f}",
                      "ymin": f"{b.y0:.1f}", "xmax": f"{b.x1:.1f}", "ymax": f"{b.y1:.1f}"}
                     for b in boxes]
        path = csv_path(root, split)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=COLUMNS)
            writer.writeheader()
            writer.writerows(rows)
        if variety:  # VinDr has no such file: only varied phantoms say how hard each image is
            with open(conditions_path(root, split), "w", newline="") as handle:
                writer = csv.DictWriter(handle, fieldnames=CONDITION_COLUMNS)
                writer.writeheader()
                writer.writerows(drawn)
    return root


def conditions_path(root: Path, split: str) -> Path:
    return csv_path(root, split).with_name(f"{split}_conditions.csv")


def read_bands(root: Path, split: str) -> dict[str, str]:
    """image_id -> difficulty band of a varied phantom split; empty for any other data."""
    path = conditions_path(root, split)
    if not path.exists():
        return {}
    with open(path, newline="") as handle:
        return {row["image_id"]: row["band"] for row in csv.DictReader(handle)}
