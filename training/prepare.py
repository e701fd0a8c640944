"""``spinenode train prepare``: from a VinDr-SpineXR folder to a run folder that training reads.

RUN/
  config.yaml            the configuration used
  dataset.json           every image: split, label, boxes, fold; and the data's fingerprint
  cache/<image_id>.npy   the normalised image (workers.imaging, the serving code), float16,
                         longer side at most data.cache_size; written atomically, so an
                         interrupted run resumes where it stopped
  yolo/                  ultralytics layout: images/{train,val,test}/*.png,
                         labels/{train,val,test}/*.txt (class cx cy w h, normalised), data.yaml
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import yaml
from PIL import Image
from tqdm import tqdm

from training.config import TrainingConfig
from training.dataset_index import DatasetIndex, IndexedImage
from training.vindr import ImageRecord, read_split
from workers.bundle import VINDR_CLASSES
from workers.dernet import cached_view
from workers.imaging import decode


def cache_image(record: ImageRecord, cache_dir: Path, cache_size: int) -> Path:
    """The decoded, normalised image at cache size; decoded only if not cached yet."""
    target = cache_dir / f"{record.image_id}.npy"
    if target.exists():
        return target
    pixels = cached_view(decode(record.path).pixels, cache_size)  # as serving sees it too
    partial = target.with_suffix(".partial.npy")
    np.save(partial, pixels)
    os.replace(partial, target)
    return target


def stratified_folds(records: list[ImageRecord], folds: int, seed: int) -> dict[str, int]:
    """Image id -> fold, normal and abnormal images dealt round-robin after a seeded shuffle."""
    rng = np.random.default_rng(seed)
    assignment: dict[str, int] = {}
    for label in (False, True):
        group = [r.image_id for r in records if r.abnormal == label]
        for position, index in enumerate(rng.permutation(len(group))):
            assignment[group[index]] = position % folds
    return assignment


def detector_validation(train: list[ImageRecord], fraction: float, seed: int) -> set[str]:
    """The detector's validation images: a stratified ``fraction`` of the training split (never
    the test set), normal and abnormal images in proportion."""
    rng = np.random.default_rng([seed, 1])
    chosen: set[str] = set()
    for label in (False, True):
        group = sorted(r.image_id for r in train if r.abnormal == label)
        count = max(1, round(fraction * len(group))) if group else 0
        chosen.update(group[i] for i in rng.permutation(len(group))[:count])
    return chosen


def yolo_label_lines(record: ImageRecord, width: int, height: int) -> list[str]:
    """Boxes in original pixels -> 'class cx cy w h', normalised (scale does not matter)."""
    lines = []
    for box in record.boxes:
        cx, cy = (box.x0 + box.x1) / 2 / width, (box.y0 + box.y1) / 2 / height
        w, h = (box.x1 - box.x0) / width, (box.y1 - box.y0) / height
        lines.append(f"{box.class_index} {cx:.6f} {cy:.6f} {w:.6f} {h:.6f}")
    return lines


def fingerprint(records: list[ImageRecord]) -> str:
    """SHA-256 over the annotations and the image files' sizes: which data a bundle saw."""
    digest = hashlib.sha256()
    for record in sorted(records, key=lambda r: (r.split, r.image_id)):
        digest.update(f"{record.split}/{record.image_id}/{record.path.stat().st_size}".encode())
        for box in record.boxes:
            digest.update(f"{box.class_name},{box.x0},{box.y0},{box.x1},{box.y1}".encode())
    return digest.hexdigest()


def prepare(data: Path, run: Path, config: TrainingConfig) -> DatasetIndex:
    settings = config.data
    records = read_split(data, "train") + read_split(data, "test")
    train = [r for r in records if r.split == "train"]
    folds = stratified_folds(train, settings.folds, settings.seed)
    validation = detector_validation(train, settings.val_fraction, settings.seed)
    detector_split = {
        r.image_id: "test" if r.split == "test" else ("val" if r.image_id in validation
                                                      else "train")
        for r in records
    }
    run.mkdir(parents=True, exist_ok=True)
    (run / "config.yaml").write_text(yaml.safe_dump(config.model_dump(mode="json"),
                                                     sort_keys=False))
    cache_dir = run / "cache"
    cache_dir.mkdir(exist_ok=True)
    yolo = run / "yolo"
    images = []
    for record in tqdm(records, desc="prepare", unit="image"):
        cached = np.load(cache_image(record, cache_dir, settings.cache_size))
        part = detector_split[record.image_id]
        png = yolo / "images" / part / f"{record.image_id}.png"
        if not png.exists():
            png.parent.mkdir(parents=True, exist_ok=True)
            grey = np.round(cached.astype(np.float32) * 255).astype(np.uint8)
            Image.fromarray(grey).save(png)
        ds_rows, ds_cols = _original_size(record)
        label = yolo / "labels" / part / f"{record.image_id}.txt"
        label.parent.mkdir(parents=True, exist_ok=True)
        label.write_text("".join(f"{line}\n" for line in yolo_label_lines(record, ds_cols,
                                                                           ds_rows)))
        images.append(IndexedImage(
            image_id=record.image_id, split=record.split, abnormal=record.abnormal,
            fold=folds.get(record.image_id), detector_split=part, rows=ds_rows, columns=ds_cols,
            boxes=[(b.class_name, b.x0, b.y0, b.x1, b.y1) for b in record.boxes],
        ))
    (yolo / "data.yaml").write_text(yaml.safe_dump({
        "path": str(yolo.resolve()), "train": "images/train", "val": "images/val",
        "test": "images/test", "names": dict(enumerate(VINDR_CLASSES)),
    }, sort_keys=False))
    dataset = DatasetIndex(source=str(data.resolve()), fingerprint=fingerprint(records),
                           classes=list(VINDR_CLASSES), images=images)
    dataset.write(run)
    return dataset


def _original_size(record: ImageRecord) -> tuple[int, int]:
    from pydicom import dcmread

    ds = dcmread(record.path, stop_before_pixels=True)
    return int(ds.Rows), int(ds.Columns)
