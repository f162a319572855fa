"""Thresholds that meet a recall target, and the metrics reported beside them."""

from __future__ import annotations

import numpy as np

__all__ = ["binary_metrics", "roc_auc", "threshold_for_recall"]


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


def roc_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve by the rank-sum statistic (ties count one half)."""
    labels = np.asarray(labels).astype(bool)
    scores = np.asarray(scores, dtype=np.float64)
    pos, neg = scores[labels], scores[~labels]
    if pos.size == 0 or neg.size == 0:
        return float("nan")
    greater = (pos[:, None] > neg[None, :]).sum()
    ties = (pos[:, None] == neg[None, :]).sum()
    return float((greater + 0.5 * ties) / (pos.size * neg.size))


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
