"""Multiply-accumulates of the real modules, counted by ``torch.utils.flop_counter``.

No hard-coded constants: the screen's per-image early cost, its per-group late cost and the
individual model's per-image cost are measured on the modules that run, so a compressed or
re-split model reports its own savings.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.utils.flop_counter import FlopCounterMode

from ngt_ray.model import GroupTestingModel

__all__ = ["ModelCosts", "count_macs", "model_costs"]


@dataclass(frozen=True)
class ModelCosts:
    early_per_image: int  # stages before the merge, paid by every image
    late_per_group: int  # stages after the merge and the head, paid once per group
    individual_per_image: int  # the whole individual model


def count_macs(fn, *args) -> int:
    """MACs of one call (flop_counter counts a multiply-add as two FLOPs)."""
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        fn(*args)
    return counter.get_total_flops() // 2


def model_costs(screen: GroupTestingModel, individual: GroupTestingModel, screen_size: int,
                individual_size: int | None = None) -> ModelCosts:
    """Count the three costs with a batch of one, each model at its own input size."""
    x = torch.zeros(1, 3, screen_size, screen_size, dtype=torch.uint8)
    side = individual_size or screen_size
    screen, individual = screen.cpu().eval(), individual.cpu().eval()
    with torch.no_grad():
        h = screen.early(x)
    return ModelCosts(
        early_per_image=count_macs(screen.early, x),
        late_per_group=count_macs(screen.late, h),
        individual_per_image=count_macs(individual, torch.zeros(1, 3, side, side, dtype=torch.uint8)),
    )
