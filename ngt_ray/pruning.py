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
``resize_to_state`` gives a freshly built model those shapes before the tensors are loaded.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import nn

from ngt_ray.model import GroupTestingModel

__all__ = ["SharedStages", "channel_pruner", "resize_to_state"]


class SharedStages(nn.Module):
    """The shared stages and head of a screen model as one module: embeddings in, logits out.

    The merges between stages are element-wise maxima over group members, which never mix
    channels, so a network traced without them has the same channel dependencies.
    """

    def __init__(self, model: GroupTestingModel) -> None:
        super().__init__()
        self.first = model.merge_at
        self.stages = model.backbone.stages[self.first :]
        self.head = model.head

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


def _resize_conv(conv: nn.Conv2d, weight_shape: torch.Size) -> None:
    out_channels, in_per_group = weight_shape[0], weight_shape[1]
    depthwise = conv.groups == conv.in_channels == conv.out_channels and conv.groups > 1
    conv.groups = out_channels if depthwise else conv.groups
    conv.out_channels, conv.in_channels = out_channels, in_per_group * conv.groups
    conv.weight = nn.Parameter(conv.weight.new_empty(weight_shape))
    if conv.bias is not None:
        conv.bias = nn.Parameter(conv.bias.new_empty(out_channels))


def _resize_norm(bn: nn.BatchNorm2d, features: int) -> None:
    bn.num_features = features
    if bn.affine:
        bn.weight = nn.Parameter(bn.weight.new_empty(features))
        bn.bias = nn.Parameter(bn.bias.new_empty(features))
    if bn.track_running_stats:
        bn.running_mean = bn.running_mean.new_zeros(features)
        bn.running_var = bn.running_var.new_ones(features)


def _resize_linear(linear: nn.Linear, weight_shape: torch.Size) -> None:
    linear.out_features, linear.in_features = weight_shape
    linear.weight = nn.Parameter(linear.weight.new_empty(weight_shape))
    if linear.bias is not None:
        linear.bias = nn.Parameter(linear.bias.new_empty(weight_shape[0]))


_RESIZERS: dict[type, Callable[[nn.Module, torch.Size], None]] = {
    nn.Conv2d: _resize_conv,
    nn.BatchNorm2d: lambda bn, shape: _resize_norm(bn, shape[0]),
    nn.Linear: _resize_linear,
}


def resize_to_state(model: nn.Module, state: Mapping[str, torch.Tensor]) -> list[str]:
    """Give every convolution, batch norm and linear layer of ``model`` the weight shape stored in
    ``state`` (a pruned checkpoint), in place. Returns the names of the resized modules."""
    resized = []
    for name, module in model.named_modules():
        weight = state.get(f"{name}.weight" if name else "weight")
        if weight is None or not hasattr(module, "weight") or module.weight.shape == weight.shape:
            continue
        resize = next((fn for cls, fn in _RESIZERS.items() if isinstance(module, cls)), None)
        if resize is None:
            raise ValueError(f"checkpoint changes the shape of {name} ({type(module).__name__}), which cannot be resized")
        resize(module, weight.shape)
        resized.append(name)
    return resized
