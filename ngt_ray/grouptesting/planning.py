"""Expected cost per image of each algorithm, the group size that minimises it, and a running
prevalence estimate, so ``--group-size auto`` adapts as the job streams.

Costs come from the real modules (MACs counted by flop_counter, or seconds measured on the
device); test behaviour comes from the calibration stored in the model card: per group size the
recall of positive groups and the pass rate of negative groups at the calibrated threshold.
Tests are treated as independent given the group's content, the standard approximation in the
group-testing literature; the evaluation job measures the real thing.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from ngt_ray.grouptesting.algorithms import get_algorithm
from ngt_ray.grouptesting.calibration import CalibrationRow
from ngt_ray.grouptesting.cost_table import StageCosts
from ngt_ray.grouptesting.grouping import nearest_size

__all__ = ["PrevalenceEstimate", "ScreenQuality", "choose_group_size", "expected_cost"]


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


def expected_cost(algorithm: str, k: int, p: float, costs: StageCosts, quality: ScreenQuality,
                  min_size: int = 1) -> float:
    """Expected cost per image of screening plus confirmation with the registered ``algorithm``,
    in the units of ``costs``."""
    return get_algorithm(algorithm).expected_cost(k, p, costs, quality, min_size)


def choose_group_size(algorithm: str, sizes: list[int], p: float, costs: StageCosts, quality: ScreenQuality,
                      min_size: int = 1, screen_only_if_cheaper: bool = False) -> int:
    """The size among ``sizes`` (the calibrated ones) with the lowest expected cost per image.

    With ``screen_only_if_cheaper``, 0 where even that size is expected to cost more than the
    individual model on every image (a screen that passes most negative groups, or a prevalence
    too high for group testing to pay): the caller then confirms every image unscreened.
    """
    k = min(sizes, key=lambda k: (expected_cost(algorithm, k, p, costs, quality, min_size), k))
    if screen_only_if_cheaper and expected_cost(algorithm, k, p, costs, quality, min_size) >= costs.confirm:
        return 0
    return k


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
