"""Detection metrics on a fixed case worked out by hand (COCOeval underneath)."""

from __future__ import annotations

import numpy as np
import pytest

from training.evaluate import (
    coco_evaluate,
    ensemble_ablation,
    precision_recall,
    quality_per_band,
    threshold_table,
)
from training.metrics import auroc

SIZES = {"a": (100, 100), "normal": (100, 100)}
TRUTH = [{"image_id": "a", "class_index": 0, "box": [10, 10, 50, 50]},
         {"image_id": "a", "class_index": 1, "box": [60, 60, 90, 90]}]
FOUND = [{"image_id": "a", "class_index": 0, "score": 0.9, "box": [10, 10, 50, 50]},
         {"image_id": "normal", "class_index": 0, "score": 0.8, "box": [5, 5, 40, 40]},
         # IoU 690/1110 = 0.62: a hit at 0.50-0.60, a miss from 0.65 up
         {"image_id": "a", "class_index": 1, "score": 0.7, "box": [67, 60, 97, 90]}]


def test_map_on_a_fixed_case() -> None:
    result = coco_evaluate(TRUTH, FOUND, SIZES)
    # Class 0: the true box ranks first, so the false one on the normal image costs nothing
    # under interpolated precision; class 1 counts at 3 of the 10 IoU thresholds.
    assert result["map50"] == pytest.approx(1.0)
    assert result["map50_95"] == pytest.approx((1.0 + 0.3) / 2)
    assert result["ap50"]["Osteophytes"] == pytest.approx(1.0)
    assert result["ap50"]["Surgical implant"] == pytest.approx(1.0)
    assert result["ap50"]["Other lesions"] is None  # no ground truth: not averaged
    # COCO's area ranges: the class-1 box (30x30) is small, the class-0 one (40x40) medium
    assert result["map_small"] == pytest.approx(0.3)
    assert result["map_large"] is None  # no large ground truth


def test_false_positive_ranked_first_lowers_ap() -> None:
    found = [dict(FOUND[1], score=0.95), *FOUND[:1], FOUND[2]]
    result = coco_evaluate(TRUTH, found, SIZES)
    assert result["ap50"]["Osteophytes"] == pytest.approx(0.5, abs=0.01)


def test_precision_and_recall_at_the_operating_point() -> None:
    table = precision_recall(TRUTH, FOUND)
    assert table["Osteophytes"] == {"precision": 0.5, "recall": 1.0}
    assert table["Surgical implant"] == {"precision": 1.0, "recall": 1.0}
    assert table["Vertebral collapse"] == {"precision": None, "recall": None}
    assert precision_recall(TRUTH, FOUND, iou=0.7)["Surgical implant"]["recall"] == 0.0


def test_ensemble_ablation_rows() -> None:
    rng = np.random.default_rng(0)
    labels = np.array([0, 1] * 20, dtype=bool)
    # member -> (images, views [identity, hflip]); "b" is better than "a"
    views = {"a": rng.random((40, 2)), "b": np.clip(labels[:, None] * 0.3 + rng.random((40, 2))
                                                    * 0.7, 0, 1)}
    rows = {r["configuration"]: r for r in ensemble_ablation(
        labels, views, {"a": 0.25, "b": 0.75}, ["identity", "hflip"], 0.5)}
    assert rows["a only"]["auroc"] == pytest.approx(auroc(labels, views["a"].mean(axis=1)))
    assert rows["a only"]["weights"] == [1.0, 0.0]
    assert rows["uniform ensemble"]["auroc"] == pytest.approx(
        auroc(labels, views["a"].mean(axis=1) + views["b"].mean(axis=1)))
    no_tta = 0.25 * views["a"][:, 0] + 0.75 * views["b"][:, 0]
    assert rows["DERNet (searched weights), no TTA"]["auroc"] == pytest.approx(
        auroc(labels, no_tta))
    with_tta = rows["DERNet + TTA (2 views)"]
    assert with_tta["auroc"] == pytest.approx(auroc(
        labels, 0.25 * views["a"].mean(axis=1) + 0.75 * views["b"].mean(axis=1)))
    assert with_tta["weights"] == [0.25, 0.75]


def test_threshold_table_around_the_chosen_threshold() -> None:
    labels = np.array([False, False, True, True])
    rows = threshold_table(labels, np.array([0.1, 0.45, 0.35, 0.8]), 0.42)
    assert [r["threshold"] for r in rows] == [0.3, 0.4, 0.42, 0.5, 0.6]
    assert [r["chosen"] for r in rows] == [False, False, True, False, False]
    by = {r["threshold"]: r for r in rows}
    assert (by[0.3]["sensitivity"], by[0.3]["specificity"], by[0.3]["f1"]) == (1.0, 0.5, 0.8)
    assert by[0.3]["youden_j"] == pytest.approx(0.5)
    assert by[0.42]["youden_j"] == pytest.approx(0.0)
    assert (by[0.5]["sensitivity"], by[0.5]["specificity"]) == (0.5, 1.0)
    assert by[0.5]["f1"] == pytest.approx(2 / 3)


def test_quality_per_band() -> None:
    bands = {"a": "easy", "normal": "easy", "b": "hard", "c": "hard"}
    ids = ["a", "normal", "b", "c", "plain"]  # "plain": no band (not counted in any)
    labels = np.array([1, 0, 1, 1, 0])
    scores = np.array([0.9, 0.2, 0.3, 0.8, 0.99])
    sizes = {**SIZES, "b": (100, 100), "c": (100, 100), "plain": (100, 100)}
    truth = [*TRUTH, {"image_id": "b", "class_index": 2, "box": [10, 10, 40, 40]}]
    found = [*FOUND, {"image_id": "b", "class_index": 2, "score": 0.5, "box": [60, 60, 90, 90]}]
    easy, hard = quality_per_band(bands, ids, labels, scores, 0.5, truth, found, sizes)
    assert easy == {"band": "easy", "images": 2, "abnormal": 1, "auroc": 1.0, "sensitivity": 1.0,
                    "specificity": 1.0,
                    "map50": coco_evaluate(TRUTH, FOUND, SIZES)["map50"]}
    # Hard: both abnormal (no AUROC), one called; its one box missed entirely.
    assert hard == {"band": "hard", "images": 2, "abnormal": 2, "auroc": None,
                    "sensitivity": 0.5, "specificity": None, "map50": 0.0}
    assert quality_per_band({}, ids, labels, scores, 0.5, truth, found, sizes) == []
