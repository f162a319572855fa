"""EASIER depth reduction (Quétu, Liao & Tartaglione, 2024): remove the least useful activations.

A rectifier whose units are almost always in the same state (always passing, or always
clipped) acts as a linear map on the data, and replacing it by the identity changes little. The
entropy of each unit's state over the data measures this; the activation with the lowest mean
entropy is linearised, the model is fine-tuned briefly, and the loop repeats while acceptance
holds. For the rare class the entropy is measured on positive and negative groups separately and
an activation counts as useless only if it is so on both (the larger of the two entropies ranks),
so an activation that only positives exercise is kept.

ReLU6 has three states: off (x <= 0), linear (0 < x < 6) and saturated (x >= 6); entropies are in
bits. Only activation modules called exactly once per forward pass are candidates: a module
shared between sites cannot be replaced at one site alone.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from ngt_ray.nets.model import GroupTestingModel, gather
from ngt_ray.nets.surgery import RECTIFIERS

__all__ = ["activation_entropy"]



def _states(x: torch.Tensor, module: nn.Module) -> torch.Tensor:
    """State index per element: 0 off, 1 linear, 2 saturated (ReLU never saturates)."""
    states = (x > 0).to(torch.uint8)
    if isinstance(module, nn.ReLU6):
        states += (x >= 6).to(torch.uint8)
    return states


def _candidates(model: GroupTestingModel, first: int) -> dict[str, nn.Module]:
    return {f"backbone.stages.{first + i}.{name}" if name else f"backbone.stages.{first + i}": m
            for i, stage in enumerate(model.backbone.stages[first:])
            for name, m in stage.named_modules() if isinstance(m, RECTIFIERS)}


def _unit_entropy(counts: torch.Tensor, total: int) -> float:
    """Mean over units of the entropy (bits) of their state frequencies; ``counts`` is (3, units)."""
    p = counts.double() / total
    h = -(p * torch.log2(p.clamp(min=1e-12))).sum(0)
    return float(h.mean())


@torch.no_grad()
def activation_entropy(model: GroupTestingModel, embedded: torch.Tensor, labels: np.ndarray,
                       groups: Sequence[Sequence[int]], device: torch.device,
                       batch_groups: int = 32) -> dict[str, dict[str, float]]:
    """Per activation of the shared stages: mean unit entropy on positive and on negative
    ``groups`` of cached embeddings (a unit is one channel at one position), and ``score``, the
    larger of the two. Activations called more than once per pass are left out. The groups must
    all have one size, so that merged rows map back to their groups."""
    if len({len(g) for g in groups}) != 1:
        raise ValueError("activation entropy needs groups of one size")
    candidates = _candidates(model, model.merge_at)
    counts: dict[tuple[str, bool], torch.Tensor] = {}
    totals: dict[tuple[str, bool], int] = {}
    calls: dict[str, int] = dict.fromkeys(candidates, 0)
    shared: set[str] = set()
    positive_rows: list[torch.Tensor] = []

    def hook(name: str, module: nn.Module):
        def fn(_module: nn.Module, inputs: tuple[torch.Tensor, ...], _output: torch.Tensor) -> None:
            calls[name] += 1
            x = inputs[0]
            states = _states(x, module).flatten(1)  # (merged rows, units)
            # a tree merge has several rows per group before its last depth, in group order
            flags = positive_rows[0].repeat_interleave(states.shape[0] // positive_rows[0].numel())
            for positive in (True, False):
                rows = flags == positive
                if not rows.any():
                    continue
                one_hot = torch.stack([(states[rows] == s).sum(0) for s in range(3)])
                key = (name, positive)
                counts[key] = counts.get(key, 0) + one_hot
                totals[key] = totals.get(key, 0) + int(rows.sum())
        return fn

    # the hooks see inputs *before* an in-place activation overwrites them
    saved_inplace = {name: getattr(m, "inplace", False) for name, m in candidates.items()}
    handles = []
    for name, m in candidates.items():
        m.inplace = False
        handles.append(m.register_forward_hook(hook(name, m)))
    was_training = model.training
    model.eval()
    try:
        for i in range(0, len(groups), batch_groups):
            chunk = [list(g) for g in groups[i : i + batch_groups]]
            positive_rows[:] = [torch.tensor([bool(labels[g].any()) for g in chunk], device=device)]
            before = dict(calls)
            model.score_groups(gather(embedded, chunk, device), [len(g) for g in chunk])
            # a module called twice in one pass is shared between sites
            shared.update(name for name, n in calls.items() if n - before[name] > 1)
    finally:
        for h in handles:
            h.remove()
        for name, m in candidates.items():
            m.inplace = saved_inplace[name]
        model.train(was_training)
    out = {}
    for name in candidates:
        if name in shared or (name, True) not in counts or (name, False) not in counts:
            continue
        pos = _unit_entropy(counts[(name, True)], totals[(name, True)])
        neg = _unit_entropy(counts[(name, False)], totals[(name, False)])
        out[name] = {"positive": pos, "negative": neg, "score": max(pos, neg)}
    return out
