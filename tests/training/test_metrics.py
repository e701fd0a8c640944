"""Our metrics against sklearn on fixed cases."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import f1_score, roc_auc_score, roc_curve

from training.metrics import auroc, binary_report, ensemble_weight_search, youden_threshold

RNG = np.random.default_rng(0)
LABELS = RNG.random(300) < 0.4
SCORES = np.round(np.clip(LABELS * 0.3 + RNG.normal(0.4, 0.2, 300), 0, 1), 2)  # with ties


def test_auroc_matches_sklearn() -> None:
    assert auroc(LABELS, SCORES) == pytest.approx(roc_auc_score(LABELS, SCORES), abs=1e-12)
    assert auroc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == 0.75


def test_youden_matches_sklearn_roc_curve() -> None:
    fpr, tpr, thresholds = roc_curve(LABELS, SCORES)
    expected = thresholds[np.argmax(tpr - fpr)]
    assert youden_threshold(LABELS, SCORES) == pytest.approx(expected)


def test_report_matches_sklearn() -> None:
    report = binary_report(LABELS, SCORES, threshold=0.5, bootstrap=200)
    predicted = SCORES >= 0.5
    assert report.f1 == pytest.approx(f1_score(LABELS, predicted))
    assert report.sensitivity == pytest.approx((predicted & LABELS).sum() / LABELS.sum())
    assert report.specificity == pytest.approx((~predicted & ~LABELS).sum() / (~LABELS).sum())
    assert report.auroc_ci[0] < report.auroc < report.auroc_ci[1]


def test_weight_search_finds_the_informative_member() -> None:
    noise = RNG.random(300)
    weights, score = ensemble_weight_search(LABELS, {"good": SCORES, "noise": noise,
                                                     "weak": SCORES * 0.5 + noise * 0.5})
    assert sum(weights.values()) == pytest.approx(1)
    assert all(round(w / 0.05, 6).is_integer() for w in weights.values())
    assert weights["good"] >= 0.5 and score >= auroc(LABELS, SCORES) - 1e-12
