"""What each piece of the pipeline costs: MACs counted on the real modules, seconds measured.

No hard-coded constants. MACs come from ``torch.utils.flop_counter`` on the modules that run, so a
compressed or re-split model reports its own savings. Seconds are measured on the device the
actors use, because the per-image early stages are memory-bound on a GPU and cost far more time
than their share of MACs: a MAC saving overstates the real one, so both are reported.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from torch.utils.flop_counter import FlopCounterMode

from ngt_ray.grouping import nearest_size
from ngt_ray.model import GroupTestingModel
from ngt_ray.runtime import inference_context

__all__ = ["StageCosts", "count_macs", "median_seconds", "plan_sizes", "stage_macs", "stage_seconds"]


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


def count_macs(fn: Callable, *args) -> int:
    """MACs of one call (flop_counter counts a multiply-add as two FLOPs)."""
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        fn(*args)
    return counter.get_total_flops() // 2


def _inputs(screen: GroupTestingModel, screen_size: int, individual_size: int,
            device: torch.device, batch: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    x = torch.randint(0, 256, (batch, 3, screen_size, screen_size), dtype=torch.uint8, device=device)
    xi = torch.randint(0, 256, (batch, 3, individual_size, individual_size), dtype=torch.uint8, device=device)
    with inference_context(device):
        h = screen.embed(x[:1])
    return x, xi, h


def stage_macs(screen: GroupTestingModel, individual: GroupTestingModel, screen_size: int, individual_size: int,
               sizes: Iterable[int]) -> StageCosts:
    """MACs of the three pieces, counted on CPU copies of the real modules, each at its input size."""
    screen, individual = screen.cpu().eval(), individual.cpu().eval()
    x, xi, h = _inputs(screen, screen_size, individual_size, torch.device("cpu"))
    group = {s: count_macs(screen.score_groups, h.float().expand(s, *h.shape[1:]).contiguous(), [s]) for s in sizes}
    return StageCosts(count_macs(screen.embed, x), group, count_macs(individual, xi), "MACs")


def median_seconds(fn: Callable[[], object], device: torch.device, reps: int) -> float:
    """Median wall time of ``fn`` after one warm-up call (synchronised on CUDA)."""
    times = []
    for i in range(reps + 1):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        with inference_context(device):
            fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if i:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def stage_seconds(screen: GroupTestingModel, individual: GroupTestingModel, screen_size: int, individual_size: int,
                  sizes: Iterable[int], device: torch.device, batch: int | None = None,
                  reps: int | None = None) -> StageCosts:
    """Seconds of the three pieces on ``device``, per image or per test, at a realistic batch size
    (256 images, 5 repeats on a GPU; 8 images, 2 repeats on a CPU, where each call is slow)."""
    on_gpu = device.type == "cuda"
    batch, reps = batch or (256 if on_gpu else 8), reps or (5 if on_gpu else 2)
    screen, individual = screen.to(device).eval(), individual.to(device).eval()
    x, xi, _ = _inputs(screen, screen_size, individual_size, device, batch)
    with inference_context(device):
        h = screen.embed(x)
    embed = median_seconds(lambda: screen.embed(x), device, reps) / batch
    confirm = median_seconds(lambda: individual(xi), device, reps) / batch
    group = {}
    for s in sizes:
        n_groups = max(1, batch // s)
        members = h[torch.arange(n_groups * s, device=device) % batch]
        group[s] = median_seconds(lambda m=members, sz=[s] * n_groups: screen.score_groups(m, sz), device, reps) / n_groups
    return StageCosts(embed, group, confirm, "seconds", device.type)
