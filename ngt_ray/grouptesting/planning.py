"""Expected cost per image of each algorithm, the group size that minimises it, and a running
prevalence estimate, so ``--group-size auto`` adapts as the job streams.

Costs come from the real modules (MACs counted by flop_counter, or seconds measured on the
device); test behaviour comes from the calibration stored in the model card: per group size the
recall of positive groups and the pass rate of negative groups at the calibrated threshold.
Tests are treated as independent given the group's content, the standard approximation in the
group-testing literature; the evaluation job measures the real thing.
"""

from __future__ import annotations

import numpy as np

from ngt_ray.grouptesting.algorithms import get_algorithm
from ngt_ray.grouptesting.calibration import ScreenQuality
from ngt_ray.grouptesting.cost_table import StageCosts

__all__ = ["PrevalenceEstimate", "choose_group_size", "expected_cost", "group_size_that_pays"]


def expected_cost(algorithm: str, k: int, p: float, costs: StageCosts, quality: ScreenQuality,
                  min_size: int = 1) -> float:
    """Expected cost per image of screening plus confirmation with the registered ``algorithm``,
    in the units of ``costs``."""
    return get_algorithm(algorithm).expected_cost(k, p, costs, quality, min_size)


def choose_group_size(algorithm: str, sizes: list[int], p: float, costs: StageCosts, quality: ScreenQuality,
                      min_size: int = 1) -> int:
    """The size among ``sizes`` (the calibrated ones) with the lowest expected cost per image."""
    return min(sizes, key=lambda k: (expected_cost(algorithm, k, p, costs, quality, min_size), k))


def group_size_that_pays(algorithm: str, sizes: list[int], p: float, costs: StageCosts, quality: ScreenQuality,
                         min_size: int = 1) -> int | None:
    """``choose_group_size``, or None where even that size is expected to cost more than the
    individual model on every image (a screen that passes most negative groups, or a prevalence
    too high for group testing to pay): the caller then confirms every image unscreened."""
    k = choose_group_size(algorithm, sizes, p, costs, quality, min_size)
    return k if expected_cost(algorithm, k, p, costs, quality, min_size) < costs.confirm else None


class PrevalenceEstimate:
    """Running prevalence estimate from the fraction of positive first-round groups.

    P(group positive) = r (1 - (1-p)^k) + f (1-p)^k is inverted for p, pooling groups seen so far
    with a prior worth ``prior_groups`` groups at ``prior`` prevalence.
    """

    def __init__(self, prior: float = 0.01, prior_groups: float = 50.0) -> None:
        self.prior, self.prior_groups = prior, prior_groups
        self.groups = 0.0
        self.evidence = 0.0  # sum of per-group prevalence estimates, weighted by groups

    def update(self, k: int, n_groups: int, n_positive: int, quality: ScreenQuality) -> float:
        if n_groups:
            q = n_positive / n_groups
            r, f = quality.recall_at(k), quality.pass_rate_at(k)
            clean = np.clip((r - q) / max(r - f, 1e-6), 1e-9, 1.0)
            self.evidence += n_groups * float(1.0 - clean ** (1.0 / k))
            self.groups += n_groups
        return self.value

    @property
    def value(self) -> float:
        return (self.prior * self.prior_groups + self.evidence) / (self.prior_groups + self.groups)
