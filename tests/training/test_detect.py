"""YOLO11 training additions: focal loss, balanced sampling, copy-paste, multi-scale; and a
smoke training run through ultralytics, offline."""

from __future__ import annotations

import math
import random
import subprocess
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from tests.support.node import SPINENODE
from training.config import load_config
from training.detect import FocalBCE, MinorityCopyPaste, balanced_weights, rescale_batch
from training.phantoms import generate


def test_focal_loss_equals_its_formula() -> None:
    logits = [-2.0, 0.0, 3.0, 1.5]
    targets = [0.0, 1.0, 1.0, 0.0]
    gamma, alpha = 2.0, 0.25
    loss = FocalBCE(gamma, alpha)(torch.tensor(logits), torch.tensor(targets))
    for value, x, y in zip(loss.tolist(), logits, targets, strict=True):
        p = 1 / (1 + math.exp(-x))
        p_t = p if y == 1 else 1 - p
        alpha_t = alpha if y == 1 else 1 - alpha
        assert value == pytest.approx(-alpha_t * (1 - p_t) ** gamma * math.log(p_t), rel=1e-5)
    # gamma 0 and alpha 0.5 is half the plain BCE
    plain = torch.nn.functional.binary_cross_entropy_with_logits(
        torch.tensor(logits), torch.tensor(targets), reduction="none")
    torch.testing.assert_close(FocalBCE(0.0, 0.5)(torch.tensor(logits), torch.tensor(targets)),
                               plain / 2)


def test_sampler_frequencies_follow_inverse_sqrt_weights() -> None:
    # 60 normal images, 30 with class 0, 9 with class 1, 1 with classes 0 and 2.
    images = [set()] * 60 + [{0}] * 30 + [{1}] * 9 + [{0, 2}]
    weights = balanced_weights(images)
    assert weights[0] == pytest.approx((100 / 60) ** 0.5)
    assert weights[60] == pytest.approx((100 / 31) ** 0.5)
    assert weights[99] == pytest.approx((100 / 1) ** 0.5)  # its rarest class decides
    draws = 50_000
    sampler = torch.utils.data.WeightedRandomSampler(
        torch.as_tensor(weights), num_samples=draws, replacement=True,
        generator=torch.Generator().manual_seed(0))
    counts = Counter(int(i) for i in sampler)
    groups = {"normal": range(0, 60), "class 0": range(60, 90), "class 1": range(90, 99),
              "class 2": range(99, 100)}
    for name, members in groups.items():
        expected = weights[list(members)].sum() / weights.sum()
        observed = sum(counts[i] for i in members) / draws
        sigma = (expected * (1 - expected) / draws) ** 0.5
        assert abs(observed - expected) < 4 * sigma, (name, observed, expected)


def test_multi_scale_draws_from_the_set() -> None:
    rng = random.Random(0)
    sizes = set()
    for _ in range(40):
        batch = rescale_batch({"img": torch.zeros(2, 3, 128, 128)}, (96, 128, 160), rng)
        assert batch["img"].shape[:2] == (2, 3)
        sizes.add(batch["img"].shape[-1])
    assert sizes == {96, 128, 160}


@pytest.fixture(scope="module")
def prepared_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("detect")
    data = generate(folder / "data", train=16, test=4, height=160, width=128, seed=9)
    run = folder / "run"
    result = subprocess.run([*SPINENODE, "train", "prepare", "--data", str(data), "--out",
                             str(run), "--config", "smoke"], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    return run


def test_copy_paste_keeps_boxes_and_labels_consistent(prepared_run: Path) -> None:
    from workers.offline import prepare_offline, ultralytics_modules

    prepare_offline(prepared_run / "ultralytics")
    ultralytics_modules()
    from ultralytics.data import YOLODataset

    data = yaml.safe_load((prepared_run / "yolo" / "data.yaml").read_text())
    data.update(nc=len(data["names"]), channels=3)
    dataset = YOLODataset(img_path=str(prepared_run / "yolo" / "images" / "train"), imgsz=128,
                          augment=False, data=data, task="detect")
    paste = MinorityCopyPaste(dataset, probability=1.0, below=1.0, seed=0)  # every class rare
    assert paste.donors
    for index in range(len(dataset)):
        label = dataset.get_image_and_label(index)
        before = len(label["cls"])
        pasted = paste(label)
        if len(pasted["cls"]) == before:
            continue  # the drawn crop did not fit this image
        assert len(pasted["instances"]) == len(pasted["cls"]) == before + 1
        box = pasted["instances"].bboxes[-1]  # normalised cx, cy, w, h inside the image
        assert ((box >= 0) & (box <= 1)).all()
        h, w = pasted["img"].shape[:2]
        x0, y0 = round((box[0] - box[2] / 2) * w), round((box[1] - box[3] / 2) * h)
        cw, ch = round(box[2] * w), round(box[3] * h)
        region = pasted["img"][y0:y0 + ch, x0:x0 + cw]
        classes = [int(c) for label in dataset.labels for c in label["cls"].reshape(-1)]
        assert int(pasted["cls"][-1][0]) in classes
        assert region.shape[:2] == (ch, cw)
        return
    pytest.fail("no paste fitted any image")


def test_smoke_detector_training_offline(prepared_run: Path) -> None:
    result = subprocess.run([*SPINENODE, "train", "detect", "--out", str(prepared_run),
                             "--config", "smoke"], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    best = prepared_run / "detect" / "train" / "weights" / "best.pt"
    checkpoint = torch.load(best, weights_only=False)
    model = checkpoint.get("ema") or checkpoint["model"]
    # A plain ultralytics model: the workers load it without the training package.
    assert type(model).__name__ == "DetectionModel" and model.model[-1].nc == 7
    assert np.isfinite(float(checkpoint.get("best_fitness") or 0.0))


def test_the_detector_trains_channels_last_and_keeps_the_usual_layout(
        prepared_run: Path, tmp_path: Path) -> None:
    # The training model's convolutions run channels-last (faster on a CPU: training/detect.py);
    # the EMA copy, which validation runs and the checkpoints keep, stays as the workers load it.
    import shutil

    from training.detect import train_detector

    def layout(model: torch.nn.Module) -> frozenset[str]:
        # Of the convolution weights whose two layouts differ (not 1x1, not depthwise).
        return frozenset(
            "channels_last" if w.is_contiguous(memory_format=torch.channels_last)
            else "usual" if w.is_contiguous() else "other"
            for w in model.parameters() if w.dim() == 4 and w.shape[1] > 1 and w.shape[-1] > 1)

    seen = []
    run = tmp_path / "run"
    shutil.copytree(prepared_run, run, ignore=shutil.ignore_patterns("detect"))
    config = load_config("smoke").detect.model_copy(update={"epochs": 1, "image_size": 64,
                                                            "scales": [64]})
    best = train_detector(run, config, callbacks={"on_train_batch_end": lambda trainer: (
        seen.append((layout(trainer.model), layout(trainer.ema.ema))))})
    assert seen and set(seen) == {(frozenset({"channels_last"}), frozenset({"usual"}))}
    checkpoint = torch.load(best, weights_only=False)
    assert layout(checkpoint.get("ema") or checkpoint["model"]) == {"usual"}


def test_ablation_rows_switch_one_step_at_a_time() -> None:
    from training.ablation import ablation_rows

    config = load_config("paper").detect
    rows = ablation_rows(config)
    additions = [settings for _, settings in rows["additions"]]
    baseline = additions[0]
    assert (baseline.mosaic, baseline.fliplr, baseline.scales) == (0, 0, [])
    assert baseline.hsv == (0, 0, 0)
    assert baseline.focal_gamma is None and not baseline.balanced_sampling
    assert baseline.copy_paste == 0
    changed = [{k for k, v in b.model_dump().items() if a.model_dump()[k] != v}
               for a, b in zip(additions[:-1], additions[1:], strict=True)]
    assert changed == [{"mosaic", "fliplr", "hsv", "scales"}, {"balanced_sampling"},
                       {"copy_paste"}, {"focal_gamma"}]
    # the last row of each table is the method as configured
    assert additions[-1] == config and rows["scales"][-1][1] == config
    assert dict(rows["focal"])["gamma=2.0, alpha=0.25"] == config
    assert [s.scales for _, s in rows["scales"]] == [[], [576, 640, 704],
                                                    [480, 576, 640, 704, 768]]


def test_interrupted_detector_training_resumes(prepared_run: Path, tmp_path: Path) -> None:
    import shutil
    import time

    from training.detect import saved_epoch, training_state

    run = tmp_path / "run"
    shutil.copytree(prepared_run, run, ignore=shutil.ignore_patterns("detect"))
    config = load_config("smoke").model_dump()
    config["detect"].update(epochs=6, image_size=64, scales=[64])
    (tmp_path / "six.yaml").write_text(yaml.safe_dump(config))
    command = [*SPINENODE, "train", "detect", "--out", str(run), "--config",
               str(tmp_path / "six.yaml")]
    weights = run / "detect" / "train" / "weights"
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while training_state(weights / "last.pt") != "partial":  # an epoch is saved
            assert process.poll() is None and time.monotonic() < deadline
            time.sleep(0.02)
    finally:
        process.kill()
        process.wait()
    results = run / "detect" / "train" / "results.csv"
    saved = saved_epoch(weights / "last.pt") + 1  # epochs the checkpoint holds
    first = results.read_text().splitlines()[:1 + saved]
    assert 2 <= len(first) < 7  # header + the epochs done before the kill
    # Ultralytics writes an epoch's row before its checkpoint: a kill between the two leaves a
    # row the checkpoint lacks. Make that window certain, not a race the test may or may not hit.
    results.write_text("\n".join([*first, first[-1].replace(
        first[-1].split(",")[0], str(saved + 1), 1)]) + "\n")
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert training_state(weights / "last.pt") == "finished"
    rows = results.read_text().splitlines()
    assert rows[:len(first)] == first  # resumed: the epochs done before are kept as they were
    assert [int(float(row.split(",")[0])) for row in rows[1:]] == [1, 2, 3, 4, 5, 6]
    # Finished: asking again trains nothing.
    again = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0
    assert (run / "detect" / "train" / "results.csv").read_text().splitlines() == rows
