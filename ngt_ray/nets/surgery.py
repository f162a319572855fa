"""Load-time edits of a model: the layer shapes and activations a compressed checkpoint records.

A pruned checkpoint stores smaller tensors, and a linearised one names the activations EASIER
replaced by the identity. Loading replays both on the freshly built model; this module is all the
load path needs, so the compression search (``pruning``, ``easier``, ``compress``) and its data
stay out of every model actor.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import torch
from torch import nn

__all__ = ["RECTIFIERS", "linearise", "resize_to_state"]

RECTIFIERS = (nn.ReLU, nn.ReLU6)


def linearise(model: nn.Module, names: Iterable[str]) -> None:
    """Replace each named activation by the identity, in place."""
    for name in names:
        if not isinstance(model.get_submodule(name), RECTIFIERS):
            raise TypeError(f"{name} is not a rectifier activation")
        model.set_submodule(name, nn.Identity())


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
            raise ValueError(f"checkpoint changes the shape of {name} ({type(module).__name__}), "
                             "which cannot be resized")
        resize(module, weight.shape)
        resized.append(name)
    return resized
