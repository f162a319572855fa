"""What each piece of a job costs, as a table of plain numbers: the planner's and aggregator's input.

Filled by ``ngt_ray.nets.profiling`` (MACs counted, seconds timed on the real modules); read by
``ngt_ray.grouptesting.planning`` and ``ngt_ray.job.stats``, which stay free of torch.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from ngt_ray.grouptesting.grouping import nearest_size

__all__ = ["StageCosts", "plan_sizes"]


@dataclass(frozen=True)
class StageCosts:
    """Cost of each piece of the pipeline in one ``unit`` ("MACs" or "seconds")."""

    embed: float  # per image: the screen model's per-image stages
    group: dict[int, float]  # per test of a group of this size: the screen model's shared stages
    confirm: float  # per image: the individual (confirmation) model
    unit: str = "MACs"
    device: str = field(default="cpu", compare=False)

    def group_cost(self, size: int) -> float:
        """Cost of one test of ``size``; an unlisted size takes the nearest listed (ties: larger)."""
        return self.group[nearest_size(self.group, size)]


def plan_sizes(k: int | Iterable[int]) -> list[int]:
    """Every size a screen of group size(s) ``k`` tests: the sizes and their halvings down to 1."""
    sizes = set()
    for size in [k] if isinstance(k, int) else k:
        while size >= 1:
            sizes.add(size)
            size = -(-size // 2) if size > 1 else 0
    return sorted(sizes)
