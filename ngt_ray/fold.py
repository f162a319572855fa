"""BatchNorm folded into the convolution before it: one kernel instead of two, exactly.

In inference a BatchNorm is an affine map per channel, so ``bn(conv(x))`` equals a convolution with
rescaled weights and a bias. Folding removes a memory-bound pass over every activation map, which
is what the per-image early stages of a screen model are made of. Pairs are found as a
convolution registered directly before a BatchNorm in the same parent (torchvision's and
EfficientNet-Lite's convention); because registration order need not be data-flow order, every
fold is checked numerically against the unfolded model and refused if it is not exact.
"""

from __future__ import annotations

import copy
import itertools

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

__all__ = ["FoldError", "fold_batchnorm"]


class FoldError(RuntimeError):
    """A fold changed the model's outputs: the pair was not conv -> BN in the data flow."""


def _fold_children(parent: nn.Module) -> int:
    folded = 0
    children = list(parent.named_children())
    for (conv_name, conv), (bn_name, bn) in itertools.pairwise(children):
        if isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d) and bn.num_features == conv.out_channels:
            setattr(parent, conv_name, fuse_conv_bn_eval(conv, bn))
            setattr(parent, bn_name, nn.Identity())
            folded += 1
    for _, child in parent.named_children():
        folded += _fold_children(child)
    return folded


def fold_batchnorm(model: nn.Module, example: torch.Tensor, rtol: float = 1e-4) -> tuple[nn.Module, int]:
    """A copy of ``model`` (in eval mode) with every conv -> BN pair folded, and the fold count.

    Raises ``FoldError`` when the folded model's output on ``example`` differs from the original's
    by more than ``rtol`` relative to the output's scale.
    """
    model = model.eval()
    folded_model = copy.deepcopy(model)
    count = _fold_children(folded_model)
    with torch.no_grad():
        want, got = model(example), folded_model(example)
    scale = want.abs().max().clamp(min=1e-6)
    if not torch.isfinite(got).all() or ((got - want).abs().max() / scale) > rtol:
        raise FoldError(f"folding {count} conv-BN pairs changed the output by "
                        f"{((got - want).abs().max() / scale).item():.2e} (relative)")
    return folded_model, count
