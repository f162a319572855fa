"""Calibration, all of it: thresholds that meet a recall target, the metrics beside them, one
rank-based AUC, and the typed per-group-size table a model card carries.

Pure numpy: the planner, the aggregator and the offline tools read the same table.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from ngt_ray.grouptesting.grouping import nearest_size

__all__ = ["CalibrationRow", "ScreenQuality", "auc_of", "binary_metrics", "calibrate_scores", "calibration_table",
           "roc_auc", "threshold_for_recall"]


@dataclass(frozen=True)
class CalibrationRow:
    """A screen model's behaviour at one group size, at the threshold calibrated for it."""

    threshold: float  # on sigmoid(logit)
    recall: float  # of positive groups (groups holding at least one positive)
    negative_pass_rate: float  # share of all-negative groups that test positive anyway
    auc: float
    positive_groups: int = 0
    negative_groups: int = 0


@dataclass(frozen=True)
class ScreenQuality:
    """Calibrated behaviour of the screen test per group size (from the model card)."""

    recall: Mapping[int, float]  # P(test positive | group holds a positive)
    pass_rate: Mapping[int, float]  # P(test positive | group holds none)

    @classmethod
    def from_card(cls, calibration: Mapping[int, CalibrationRow]) -> ScreenQuality:
        return cls({k: row.recall for k, row in calibration.items()},
                   {k: row.negative_pass_rate for k, row in calibration.items()})

    def recall_at(self, size: int) -> float:
        return self.recall[nearest_size(self.recall, size)]

    def pass_rate_at(self, size: int) -> float:
        return self.pass_rate[nearest_size(self.pass_rate, size)]

    def positive(self, size: int, p: float) -> float:
        """P(a test of ``size`` random items is positive) at prevalence ``p``."""
        clean = (1.0 - p) ** size
        return self.recall_at(size) * (1.0 - clean) + self.pass_rate_at(size) * clean


def calibration_table(raw: Mapping) -> dict[int, CalibrationRow]:
    """A card's calibration as stored in JSON (string keys, plain dicts) as a typed table."""
    return {int(size): row if isinstance(row, CalibrationRow) else CalibrationRow(**row)
            for size, row in raw.items()}


def threshold_for_recall(positive_scores: np.ndarray, target_recall: float) -> float:
    """The highest threshold ``t`` with ``mean(positive_scores >= t) >= target_recall``.

    The highest such threshold passes the fewest negatives, which is what keeps retests cheap.
    """
    scores = np.sort(np.asarray(positive_scores, dtype=np.float64))
    if scores.size == 0:
        raise ValueError("cannot calibrate a threshold without positive examples")
    if not 0.0 < target_recall <= 1.0:
        raise ValueError(f"target recall must lie in (0, 1], got {target_recall}")
    # The fewest positives ``keep`` with keep / n >= target, robust to rounding in target * n.
    n = scores.size
    keep = min(n, int(np.ceil(target_recall * n)))
    while keep > 1 and (keep - 1) / n >= target_recall:
        keep -= 1
    while keep < n and keep / n < target_recall:
        keep += 1
    return float(scores[n - keep])


def auc_of(positive_scores: np.ndarray, negative_scores: np.ndarray) -> float:
    """Area under the ROC curve by the rank-sum statistic (ties count one half), O(n log n)."""
    pos = np.asarray(positive_scores, dtype=np.float64)
    neg = np.asarray(negative_scores, dtype=np.float64)
    if pos.size == 0 or neg.size == 0:
        return float("nan")
    scores = np.concatenate([pos, neg])
    ranks = np.empty(len(scores))
    ranks[scores.argsort(kind="mergesort")] = np.arange(1, len(scores) + 1)
    _, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    ranks = np.bincount(inverse, weights=ranks)[inverse] / counts[inverse]  # ties share their mean rank
    return float((ranks[: len(pos)].sum() - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))


def roc_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """``auc_of`` for labelled scores."""
    labels = np.asarray(labels).astype(bool)
    scores = np.asarray(scores, dtype=np.float64)
    return auc_of(scores[labels], scores[~labels])


def calibrate_scores(truth: np.ndarray, scores: np.ndarray, target_recall: float) -> CalibrationRow:
    """Calibrate one group size: the highest threshold that keeps ``target_recall`` of the positive
    groups, and how the test behaves there."""
    truth = np.asarray(truth).astype(bool)
    threshold = threshold_for_recall(np.asarray(scores)[truth], target_recall)
    m = binary_metrics(truth, scores, threshold)
    return CalibrationRow(threshold, m["recall"], m["false_positive_rate"], m["auc"], m["positives"], m["negatives"])


def binary_metrics(labels: np.ndarray, scores: np.ndarray, threshold: float) -> dict[str, float]:
    """Recall, precision, false-positive rate and AUC at ``threshold``."""
    labels = np.asarray(labels).astype(bool)
    predicted = np.asarray(scores) >= threshold
    tp = int((predicted & labels).sum())
    fp = int((predicted & ~labels).sum())
    fn = int((~predicted & labels).sum())
    return {
        "positives": int(labels.sum()),
        "negatives": int((~labels).sum()),
        "recall": tp / max(tp + fn, 1),
        "precision": tp / max(tp + fp, 1),
        "false_positive_rate": fp / max(int((~labels).sum()), 1),
        "false_negatives": fn,
        "false_positives": fp,
        "auc": roc_auc(labels, scores),
    }
