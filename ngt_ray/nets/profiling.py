"""What each piece of the pipeline costs, measured on the real modules: MACs counted, seconds timed.

The results fill a ``cost_table.StageCosts`` (plain numbers, no torch), which the planner and the
aggregator read. No hard-coded constants. MACs come from ``torch.utils.flop_counter`` on the modules that run, so a
compressed or re-split model reports its own savings. Seconds are measured on the device the
actors use, because the per-image early stages are memory-bound on a GPU and cost far more time
than their share of MACs: a MAC saving overstates the real one, so both are reported.
"""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from ngt_ray.grouptesting.cost_table import StageCosts
from ngt_ray.nets.model import GroupTestingModel
from ngt_ray.nets.runtime import accelerate, inference_context

__all__ = ["count_macs", "median_seconds", "profile_screen", "stage_macs", "stage_seconds"]


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
        tests = median_seconds(lambda m=members, sz=[s] * n_groups: screen.score_groups(m, sz), device, reps)
        group[s] = tests / n_groups
    return StageCosts(embed, group, confirm, "seconds", device.type)


def profile_screen(model: GroupTestingModel, input_size: int, k: int, device: torch.device,
                   batch: int) -> dict[str, Any]:
    """Parameters, MACs and latency per batch (``fast`` runtime) of a screen model: a compression
    step's report row."""
    model = model.eval()
    x1 = torch.randint(0, 256, (1, 3, input_size, input_size), dtype=torch.uint8)
    cpu = copy.deepcopy(model).cpu()
    with torch.no_grad():
        h = cpu.embed(x1).expand(k, -1, -1, -1).contiguous()
    fast, _ = accelerate(copy.deepcopy(model).to(device), device, input_size, "fast")
    x = torch.randint(0, 256, (batch, 3, input_size, input_size), dtype=torch.uint8, device=device)
    n_groups = max(1, batch // k)
    with torch.inference_mode():
        hb = fast.embed(x)[torch.arange(n_groups * k, device=device) % batch]
    reps = 5
    return {
        "params": sum(p.numel() for p in model.parameters()),
        "shared_params": sum(p.numel() for m in model.shared_modules() for p in m.parameters()),
        "macs_per_image": count_macs(cpu, x1),
        f"macs_group_test_k{k}": count_macs(cpu.score_groups, h, [k]),
        "latency_device": device.type,
        "latency_batch": batch,
        "screen_ms_per_batch": 1e3 * median_seconds(lambda: fast(x), device, reps),
        f"group_tests_ms_per_batch_k{k}": 1e3 * median_seconds(
            lambda: fast.score_groups(hb, [k] * n_groups), device, reps),
    }
