"""The demo's bundle is trained with DERNet here and YOLO11 in a second process at once
(training.demo_bundle.train_side_by_side), tiny."""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

import training.demo_bundle
from training.classify import cross_validate
from training.config import TrainingConfig
from training.demo_bundle import train_side_by_side
from training.phantoms import generate
from training.prepare import prepare

TINY = TrainingConfig.model_validate({
    "data": {"cache_size": 64, "folds": 2, "val_fraction": 0.5, "seed": 0},
    "classify": {"members": ["resnet50"], "input_size": 32, "epochs": 1, "batch_size": 8,
                 "progressive_sizes": [32], "int8": False},
    "detect": {"scale": "n", "image_size": 64, "epochs": 1, "batch": 8, "nominal_batch": 8,
               "warmup_epochs": 0, "scales": [64]},
})


@pytest.fixture
def prepared(tmp_path: Path) -> Path:
    data = generate(tmp_path / "data", train=16, test=2, height=128, width=96, seed=3)
    prepare(data, tmp_path / "run", TINY)
    return tmp_path / "run"


def test_dernet_and_yolo11_train_side_by_side(prepared: Path) -> None:
    threads, steps = torch.get_num_threads(), []
    train_side_by_side(prepared, TINY, "cpu", steps.append)
    # in the order they finished; the first leaves its threads to the other
    assert sorted(step.split(";")[0] for step in steps) == [
        "DERNet members trained, ensemble fitted", "YOLO11 trained"]
    assert json.loads((prepared / "ensemble.json").read_text())["weights"] == {"resnet50": 1.0}
    assert (prepared / "detect" / "train" / "weights" / "best.pt").is_file()
    results = (prepared / "detect" / "train" / "results.csv").read_text().splitlines()
    assert len(results) == 2  # the header and its one epoch
    assert torch.get_num_threads() == threads  # DERNet's share ends with the detector


@pytest.mark.skipif(torch.get_num_threads() < 2, reason="one thread: nothing to hand over")
def test_the_training_that_finishes_first_leaves_its_threads_to_the_other(
        prepared: Path, capfd: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    threads, steps = torch.get_num_threads(), []
    # DERNet done before the detector has even started (its folds are kept, and resume at
    # once): the detector takes DERNet's threads at its first batch.
    cross_validate(prepared, TINY)
    train_side_by_side(prepared, TINY, "cpu", steps.append)
    assert steps == ["DERNet members trained, ensemble fitted", "YOLO11 trained"]
    assert f"demo: DERNet done; YOLO11 goes on on {threads} threads" in capfd.readouterr().out
    # The detector done first (finished before, it is not trained again): DERNet takes its
    # threads at its next batch. DERNet waits for that, so that the order is not left to chance.
    shutil.rmtree(prepared / "classify")

    def after_the_detector(run: Path, config: TrainingConfig, device: torch.device,
                           fold_bars: bool, stop: Callable[[], bool]) -> dict:
        deadline = time.monotonic() + 120
        while not stop() and torch.get_num_threads() < threads:
            assert time.monotonic() < deadline, "the detector did not finish"
            time.sleep(0.05)
        return cross_validate(run, config, device, fold_bars, stop)
    monkeypatch.setattr(training.demo_bundle, "cross_validate", after_the_detector)
    steps.clear()
    train_side_by_side(prepared, TINY, "cpu", steps.append)
    assert steps == [f"YOLO11 trained; DERNet goes on on {threads} threads",
                     "DERNet members trained, ensemble fitted"]
    assert torch.get_num_threads() == threads


def test_a_failed_detector_stops_dernet_at_once(prepared: Path) -> None:
    # DERNet alone would train for minutes: many epochs and nothing stops them early.
    long_dernet = TINY.model_copy(update={"classify": TINY.classify.model_copy(
        update={"epochs": 500, "patience": 500})})
    (prepared / "yolo" / "data.yaml").unlink()
    steps = []
    with pytest.raises(RuntimeError, match=r"YOLO11 training failed \(exit code 1\)"):
        train_side_by_side(prepared, long_dernet, "cpu", steps.append)
    assert steps == []  # DERNet stopped, not finished
    epochs = (prepared / "classify" / "resnet50" / "fold0.metrics.csv").read_text().splitlines()
    assert len(epochs) - 1 < 500  # the header, then an epoch a line
    assert not (prepared / "classify" / "resnet50" / "fold0.json").exists()  # not kept as done
