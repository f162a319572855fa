"""Class-dependent acceptance of a compression step (Entezari & Saukh).

Compression may cost false positives (a few more groups retested) but not false negatives of the
rare class (a harmful image cleared). A step is compared with the *original* model on the same
held-out groups, each model at its own threshold re-calibrated for the target recall on a
disjoint set of groups: the compressed model is kept only if a paired bootstrap cannot show that it
misses more positives, nor that its AUC is lower. Comparing with the original rather than the
previous step stops small losses from adding up over many steps.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ngt_ray.grouptesting.calibration import auc_of, roc_auc

__all__ = ["Verdict", "judge"]


@dataclass(frozen=True)
class Verdict:
    accepted: bool
    reason: str
    false_negatives: int
    reference_false_negatives: int
    false_positives: int
    reference_false_positives: int
    auc: float
    reference_auc: float
    fn_delta_interval: tuple[float, float]  # bootstrap interval of FN(compressed) - FN(original)
    auc_delta_interval: tuple[float, float]  # bootstrap interval of AUC(compressed) - AUC(original)


def judge(labels: np.ndarray, reference_scores: np.ndarray, reference_passed: np.ndarray, scores: np.ndarray,
          passed: np.ndarray, rng: np.random.Generator, n_boot: int = 1000, level: float = 0.95) -> Verdict:
    """Accept ``scores`` (the compressed model's, on the same groups as ``reference_scores``) unless
    the bootstrap shows more false negatives or a lower AUC than the reference at ``level``.

    ``passed`` and ``reference_passed`` say which groups each model sends on at its own
    re-calibrated threshold (thresholds may differ per group size, hence flags, not one number).
    Positive and negative groups are resampled separately (stratified), so every resample keeps
    the class balance of the held-out set.
    """
    labels = np.asarray(labels).astype(bool)
    ref_miss = ~np.asarray(reference_passed, dtype=bool)[labels]
    new_miss = ~np.asarray(passed, dtype=bool)[labels]
    if labels.all() or not labels.any():
        raise ValueError("acceptance needs positive and negative groups")
    pos, neg = np.flatnonzero(labels), np.flatnonzero(~labels)
    fn_delta, auc_delta = np.empty(n_boot), np.empty(n_boot)
    ref, new = np.asarray(reference_scores, dtype=np.float64), np.asarray(scores, dtype=np.float64)
    for b in range(n_boot):
        ip = rng.integers(0, len(pos), len(pos))
        ineg = neg[rng.integers(0, len(neg), len(neg))]
        fn_delta[b] = new_miss[ip].sum() - ref_miss[ip].sum()
        auc_delta[b] = auc_of(new[pos[ip]], new[ineg]) - auc_of(ref[pos[ip]], ref[ineg])
    tail = (1 - level) / 2
    fn_lo, fn_hi = np.quantile(fn_delta, [tail, 1 - tail])
    auc_lo, auc_hi = np.quantile(auc_delta, [tail, 1 - tail])
    more_misses, lower_auc = fn_lo > 0, auc_hi < 0
    reason = ("more false negatives than the original" if more_misses
              else "lower AUC than the original" if lower_auc else "no worse on the rare class")
    return Verdict(
        accepted=not (more_misses or lower_auc), reason=reason,
        false_negatives=int(new_miss.sum()), reference_false_negatives=int(ref_miss.sum()),
        false_positives=int(np.asarray(passed, dtype=bool)[~labels].sum()),
        reference_false_positives=int(np.asarray(reference_passed, dtype=bool)[~labels].sum()),
        auc=roc_auc(labels, new), reference_auc=roc_auc(labels, ref),
        fn_delta_interval=(float(fn_lo), float(fn_hi)), auc_delta_interval=(float(auc_lo), float(auc_hi)),
    )
