"""The run folder's ``dataset.json``: every image of a prepared run (split, label, boxes, fold,
original size) and the data's fingerprint. Written by ``prepare``, read here and nowhere else."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel

FILE_NAME = "dataset.json"


class IndexedImage(BaseModel):
    image_id: str
    split: Literal["train", "test"]
    abnormal: bool
    fold: int | None  # cross-validation fold of a training image; None on the test split
    detector_split: Literal["train", "val", "test"]
    rows: int  # the original image's size, to map cached-image boxes back
    columns: int
    boxes: list[tuple[str, float, float, float, float]]  # class name, x0, y0, x1, y1 (pixels)

    def cache_file(self, run: Path) -> Path:
        """The prepared (normalised, resized) image, as serving decodes it."""
        return run / "cache" / f"{self.image_id}.npy"


class DatasetIndex(BaseModel):
    source: str
    fingerprint: str
    classes: list[str]
    images: list[IndexedImage]

    @classmethod
    def read(cls, run: Path) -> DatasetIndex:
        return cls.model_validate_json((run / FILE_NAME).read_text())

    @staticmethod
    def exists(run: Path) -> bool:
        return (run / FILE_NAME).is_file()

    def write(self, run: Path) -> None:
        (run / FILE_NAME).write_text(self.model_dump_json(indent=1))

    def split(self, name: Literal["train", "test"]) -> list[IndexedImage]:
        return [image for image in self.images if image.split == name]
