"""``spinenode train prepare`` on phantoms: cache (the serving decode), folds, YOLO export."""

from __future__ import annotations

import json
import subprocess
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import yaml

from tests.support.node import SPINENODE
from training.config import load_config
from training.dataset_index import DatasetIndex
from training.phantoms import generate
from training.prepare import prepare
from training.vindr import read_split
from workers.bundle import VINDR_CLASSES
from workers.imaging import decode


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict]:
    folder = tmp_path_factory.mktemp("prepare")
    data = generate(folder / "data", train=50, test=10, height=320, width=240, seed=2)
    run = folder / "run"
    return data, run, prepare(data, run, load_config("smoke"))


def test_folds_are_stratified(prepared) -> None:
    _, run, dataset = prepared
    assert DatasetIndex.read(run) == dataset  # what prepare returns is what the run folder holds
    train = dataset.split("train")
    per_fold = Counter((image.fold, image.abnormal) for image in train)
    for label in (False, True):
        counts = [per_fold[(fold, label)] for fold in range(5)]
        assert max(counts) - min(counts) <= 1, counts
    assert all(image.fold is None for image in dataset.split("test"))
    parts = Counter(image.detector_split for image in dataset.images)
    assert parts["test"] == 10
    # smoke: val_fraction 0.2 of the training split, normal and abnormal in proportion
    for label in (False, True):
        group = [image for image in train if image.abnormal == label]
        in_val = sum(image.detector_split == "val" for image in group)
        assert in_val == round(0.2 * len(group)), (label, in_val, len(group))


def test_cache_is_the_serving_decode(prepared) -> None:
    data, run, _ = prepared
    record = read_split(data, "train")[0]
    cached = np.load(run / "cache" / f"{record.image_id}.npy")
    assert max(cached.shape) == 256  # smoke: longer side 256 from 320
    served = decode(record.path).pixels
    import torch
    import torch.nn.functional as F

    resized = F.interpolate(torch.from_numpy(served)[None, None], size=cached.shape,
                            mode="bilinear", antialias=True, align_corners=False)[0, 0].numpy()
    np.testing.assert_allclose(cached.astype(np.float32), resized, atol=1e-3)


def test_yolo_labels_match_the_boxes(prepared) -> None:
    data, run, _ = prepared
    assert yaml.safe_load((run / "yolo" / "data.yaml").read_text())["names"] == dict(
        enumerate(VINDR_CLASSES))
    checked = 0
    for record in read_split(data, "train") + read_split(data, "test"):
        labels = list((run / "yolo" / "labels").glob(f"*/{record.image_id}.txt"))
        assert len(labels) == 1
        lines = [line.split() for line in labels[0].read_text().splitlines()]
        assert len(lines) == len(record.boxes)
        for line, box in zip(lines, record.boxes, strict=True):
            cls, cx, cy, w, h = int(line[0]), *map(float, line[1:])
            assert VINDR_CLASSES[cls] == box.class_name
            np.testing.assert_allclose([(cx - w / 2) * 240, (cy - h / 2) * 320,
                                        (cx + w / 2) * 240, (cy + h / 2) * 320],
                                       [box.x0, box.y0, box.x1, box.y1], atol=1e-3)
            checked += 1
    assert checked > 0


def test_prepare_resumes(prepared) -> None:
    data, run, _ = prepared
    files = sorted((run / "cache").glob("*.npy"))
    before = {path: path.stat().st_mtime_ns for path in files}
    files[0].unlink()
    prepare(data, run, load_config("smoke"))
    after = {path: path.stat().st_mtime_ns for path in files}
    assert files[0].exists()
    assert all(after[path] == before[path] for path in files[1:])
    assert json.loads((run / "dataset.json").read_text())["fingerprint"]


def test_cli_wrong_data_path_is_one_line(tmp_path: Path) -> None:
    result = subprocess.run([*SPINENODE, "train", "prepare", "--data", str(tmp_path / "nope"),
                             "--out", str(tmp_path / "run"), "--config", "smoke"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0
    assert "is " in result.stderr and "VinDr-SpineXR folder" in result.stderr
