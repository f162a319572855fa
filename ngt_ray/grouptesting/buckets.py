"""Simulated buckets: which labelled photos a demo, an evaluation or a benchmark bucket holds.

One rule for every bucket, so "1 % prevalence" means the same thing in the demo, the evaluation
grid and the benchmark.
"""

from __future__ import annotations

import numpy as np

__all__ = ["plant"]


def plant(labels: np.ndarray, prevalence: float, rng: np.random.Generator, *, negatives: int | None = None,
          total: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the planted positives and of the negatives of a bucket at ``prevalence``.

    By default every negative (or ``negatives`` of them, drawn at random) is used once, with as
    many positives, drawn at random, as the prevalence asks; where positives run out the
    negatives shrink to keep the prevalence. With ``total``, the bucket has exactly ``total``
    images, ``round(total * prevalence)`` (at least one) of them positive, photos reused in order
    when the set is smaller (large benchmark buckets); no randomness is drawn then.
    """
    if not 0 < prevalence < 1:
        raise ValueError(f"prevalence must lie in (0, 1), got {prevalence}")
    labels = np.asarray(labels)
    pos, neg = np.flatnonzero(labels == 1), np.flatnonzero(labels == 0)
    if not len(pos) or not len(neg):
        raise ValueError(f"a bucket needs positives and negatives; got {len(pos)} and {len(neg)}")
    if total is not None:
        n_pos = max(1, round(total * prevalence))
        return pos[np.arange(n_pos) % len(pos)], neg[np.arange(total - n_pos) % len(neg)]
    n_neg = min(len(neg), negatives or len(neg))
    n_pos = max(1, round(prevalence * n_neg / (1 - prevalence)))
    if n_pos > len(pos):  # too few positives: shrink the negatives to keep the prevalence
        n_pos, n_neg = len(pos), min(n_neg, round(len(pos) * (1 - prevalence) / prevalence))
    return rng.choice(pos, n_pos, replace=False), rng.choice(neg, n_neg, replace=False)
