"""BatchNorm folded into the convolution before it: one kernel instead of two, exactly.

In inference a BatchNorm is an affine map per channel, so ``bn(conv(x))`` equals a convolution with
rescaled weights and a bias. Folding removes a memory-bound pass over every activation map, which
is what the per-image early stages of a screen model are made of. Pairs are found as a
convolution registered directly before a BatchNorm in the same parent (torchvision's and
EfficientNet-Lite's convention); because registration order need not be data-flow order, every
fold is checked numerically against the unfolded model and refused if it is not exact.

The check folds and runs float64 CPU copies of the model, whatever device the model lives on: a
GPU's reduced-precision math (cuDNN runs float32 convolutions in TF32 by default) would blur the
two outputs by ~1e-3 whether or not the fold is right, so the tolerance belongs to the check and
not to the device. A correct fold then differs by float64 rounding (~1e-15 relative); a wrong one
(a BN applied before its convolution) by order one. The model that is returned is folded in its
own dtype, and differs from the unfolded one by that dtype's rounding only.
"""

from __future__ import annotations

import copy
import itertools

import torch
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

__all__ = ["FOLD_RTOL", "FoldError", "fold_batchnorm", "fold_error"]

FOLD_RTOL = 1e-9  # relative to the output's scale, in float64: far above its rounding, far below a misfold


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


def fold_error(model: nn.Module, example: torch.Tensor) -> float:
    """How much folding changes ``model``'s output on ``example``, relative to the output's scale.

    Both the unfolded and the folded model are evaluated in float64 on the CPU, the fold itself
    done in float64 too, so what is measured is whether the folded pairs are really conv -> BN in
    the data flow, not any device's or dtype's rounding: ~1e-15 for a right fold, order one for a
    wrong one (inf when the folded output is not finite).
    """
    reference = copy.deepcopy(model).to("cpu", torch.float64).eval()
    folded = copy.deepcopy(reference)
    _fold_children(folded)
    x = example.cpu()
    if x.is_floating_point():
        x = x.double()
    with torch.no_grad():
        want, got = reference(x), folded(x)
    if not torch.isfinite(got).all():
        return float("inf")
    return float((got - want).abs().max() / want.abs().max().clamp(min=1e-300))


def fold_batchnorm(model: nn.Module, example: torch.Tensor, rtol: float = FOLD_RTOL) -> tuple[nn.Module, int]:
    """A copy of ``model`` (in eval mode) with every conv -> BN pair folded, and the fold count.

    The copy stays on the model's device and dtype. Raises ``FoldError`` when folding changes the
    output on ``example`` by more than ``rtol`` relative to the output's scale, measured in
    float64 on the CPU (see ``fold_error``): the same verdict on every device.
    """
    model = model.eval()
    folded_model = copy.deepcopy(model)
    count = _fold_children(folded_model)
    if count:
        error = fold_error(model, example)
        if error > rtol:
            raise FoldError(f"folding {count} conv-BN pairs changed the output by {error:.2e} (relative, "
                            f"float64 on the CPU; the limit is {rtol:.0e})")
    return folded_model, count
