"""Structured channel pruning of a screen model's shared stages, and the inverse on load.

Only removing whole channels makes a convolution cheaper on a GPU; masks do not. Torch-Pruning's
dependency graph finds every layer coupled to a channel (a residual stream ties the projections of
all blocks that add into it; a depthwise convolution ties its input to its output), so pruning a
channel removes it everywhere at once. Channel importance is first-order Taylor (|weight x grad|)
of a loss that up-weights positive groups, so channels the rare class depends on are the last to
go (class-dependent compression, Entezari & Saukh).

Only the stages that run once per *group* are pruned: the per-image stages before the first merge
are frozen ImageNet stages whose output is the cached embedding, and their cost is paid per image
whatever the group size. A pruned model is saved as plain tensors with their new shapes;
``surgery.resize_to_state`` gives a freshly built model those shapes before the tensors are loaded.
"""

from __future__ import annotations

import torch
from torch import nn

from ngt_ray.nets.model import GroupTestingModel

__all__ = ["SharedStages", "channel_pruner"]


class SharedStages(nn.Module):
    """The shared stages and head of a screen model as one module: embeddings in, logits out.

    The merges between stages are element-wise maxima over group members, which never mix
    channels, so a network traced without them has the same channel dependencies.
    """

    def __init__(self, model: GroupTestingModel) -> None:
        super().__init__()
        self.first = model.merge_at
        *stages, self.head = model.shared_modules()
        self.stages = nn.ModuleList(stages)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        for stage in self.stages:
            h = stage(h)
        return self.head(h)


def channel_pruner(model: GroupTestingModel, example_embedding: torch.Tensor, ratio: float, steps: int,
                   round_to: int = 8, global_ranking: bool = False):
    """A Torch-Pruning pruner over ``model``'s shared stages that removes ``ratio`` of their
    channels in ``steps`` calls to ``.step()``, with channel counts kept multiples of ``round_to``.

    By default every layer loses the same share; ``global_ranking`` ranks channels across layers
    instead (no layer loses more than 90 %), so wide layers the rare class barely uses give more.

    Call ``loss.backward()`` on a positive-weighted loss before each ``.step()``: the Taylor
    importance reads the gradients. The one-logit head keeps its output.
    """
    import torch_pruning as tp

    shared = SharedStages(model)
    return tp.pruner.BasePruner(
        shared, example_embedding, importance=tp.importance.GroupTaylorImportance(),
        pruning_ratio=ratio, iterative_steps=steps, round_to=round_to, ignored_layers=[shared.head],
        global_pruning=global_ranking, max_pruning_ratio=0.9,
    )
