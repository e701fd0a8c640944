"""Classification metrics, computed here (no sklearn at run time) and tested against sklearn."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve: the Mann-Whitney U statistic, ties counted half."""
    labels = np.asarray(labels, dtype=bool)
    scores = np.asarray(scores, dtype=np.float64)
    positives, negatives = labels.sum(), (~labels).sum()
    if positives == 0 or negatives == 0:
        raise ValueError("AUROC needs both classes")
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores), dtype=np.float64)
    sorted_scores = scores[order]
    start = 0
    while start < len(scores):  # average ranks over ties
        end = start
        while end + 1 < len(scores) and sorted_scores[end + 1] == sorted_scores[start]:
            end += 1
        ranks[order[start:end + 1]] = (start + end) / 2 + 1
        start = end + 1
    u = ranks[labels].sum() - positives * (positives + 1) / 2
    return float(u / (positives * negatives))


def youden_threshold(labels: np.ndarray, scores: np.ndarray) -> float:
    """The score threshold maximising sensitivity + specificity - 1 (predict >= threshold)."""
    labels = np.asarray(labels, dtype=bool)
    best, best_j = 0.5, -1.0
    for threshold in np.unique(scores):
        predicted = scores >= threshold
        sensitivity = (predicted & labels).sum() / labels.sum()
        specificity = (~predicted & ~labels).sum() / (~labels).sum()
        if sensitivity + specificity - 1 > best_j:
            best, best_j = float(threshold), sensitivity + specificity - 1
    return best


@dataclass(frozen=True)
class BinaryReport:
    auroc: float
    auroc_ci: tuple[float, float]  # 95 % bootstrap interval
    sensitivity: float
    specificity: float
    f1: float
    threshold: float


def binary_report(labels: np.ndarray, scores: np.ndarray, threshold: float,
                  bootstrap: int = 1000, seed: int = 0) -> BinaryReport:
    labels = np.asarray(labels, dtype=bool)
    scores = np.asarray(scores, dtype=np.float64)
    predicted = scores >= threshold
    tp = (predicted & labels).sum()
    fp = (predicted & ~labels).sum()
    fn = (~predicted & labels).sum()
    tn = (~predicted & ~labels).sum()
    rng = np.random.default_rng(seed)
    samples = []
    for _ in range(bootstrap):
        index = rng.integers(0, len(labels), len(labels))
        if labels[index].all() or not labels[index].any():
            continue
        samples.append(auroc(labels[index], scores[index]))
    low, high = np.percentile(samples, [2.5, 97.5]) if samples else (np.nan, np.nan)
    return BinaryReport(
        auroc=auroc(labels, scores), auroc_ci=(float(low), float(high)),
        sensitivity=float(tp / max(tp + fn, 1)), specificity=float(tn / max(tn + fp, 1)),
        f1=float(2 * tp / max(2 * tp + fp + fn, 1)), threshold=threshold,
    )


def ensemble_weight_search(labels: np.ndarray, member_scores: dict[str, np.ndarray],
                           step: float = 0.05) -> tuple[dict[str, float], float]:
    """Weights (on a ``step`` grid, summing to 1) maximising the ensemble's AUROC."""
    names = sorted(member_scores)
    ticks = round(1 / step)
    best_weights, best = {}, -1.0

    def search(prefix: list[int], left: int) -> None:
        nonlocal best_weights, best
        if len(prefix) == len(names) - 1:
            weights = [t / ticks for t in [*prefix, left]]
            combined = sum(w * member_scores[n] for w, n in zip(weights, names, strict=True))
            score = auroc(labels, combined)
            if score > best + 1e-12:
                best_weights, best = dict(zip(names, weights, strict=True)), score
            return
        for tick in range(left + 1):
            search([*prefix, tick], left - tick)

    search([], ticks)
    return best_weights, best
