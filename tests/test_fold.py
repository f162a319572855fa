"""BatchNorm folding: exact on real backbones, refused where registration order lies about data flow."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from ngt_ray.nets.backbone import build_backbone
from ngt_ray.nets.fold import FoldError, fold_batchnorm
from ngt_ray.nets.model import GroupTestingModel


@pytest.mark.parametrize("name", ["efficientnet-lite0", "resnet18", "mobilenet_v3_small"])
def test_folding_is_exact_and_removes_every_batchnorm_after_a_conv(name):
    torch.manual_seed(0)
    model = GroupTestingModel(build_backbone(name), (4, 6, 8), "tree").eval()
    for bn in model.modules():  # non-trivial statistics, so an unfolded BN would show
        if isinstance(bn, nn.BatchNorm2d):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
    x = torch.randint(0, 256, (4, 3, 96, 96), dtype=torch.uint8)
    folded, count = fold_batchnorm(model, x)
    assert count > 0
    remaining = [m for m in folded.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(remaining) == sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) - count
    with torch.no_grad():  # grouped scoring agrees too, not only the example the fold was checked on
        want = model.forward_groups(x, [2, 2])
        got = folded.forward_groups(x, [2, 2])
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


class _BatchNormFirst(nn.Module):
    """Registers conv before BN but applies BN first: a pair that must not be folded."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.bn.running_mean.uniform_(-1, 1)
        self.bn.running_var.uniform_(0.2, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(self.bn(x))


def test_a_fold_that_changes_the_output_is_refused():
    torch.manual_seed(0)
    with pytest.raises(FoldError):
        fold_batchnorm(_BatchNormFirst(), torch.randn(2, 4, 8, 8))


def test_runtime_switch_folds_exactly_on_cpu_and_rejects_unknown_levers():
    from ngt_ray.nets.checkpoint import default_screen_model, load_checkpoint
    from ngt_ray.nets.runtime import accelerate

    model, card = load_checkpoint(default_screen_model())
    cpu = torch.device("cpu")
    eager, applied = accelerate(model, cpu, card.input_size, "eager")
    assert eager is model and applied == {"runtime": "eager"}
    fast, applied = accelerate(model, cpu, card.input_size, "fast")
    assert applied["folded_batchnorms"] == sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) > 0
    assert not any(isinstance(m, nn.BatchNorm2d) for m in fast.modules())
    assert "channels_last" not in applied  # a GPU lever; the CPU keeps its default layout
    x = torch.randint(0, 256, (4, 3, card.input_size, card.input_size), dtype=torch.uint8)
    with torch.no_grad():
        torch.testing.assert_close(fast.forward_groups(x, [4]), model.forward_groups(x, [4]), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="runtime must be one of"):
        accelerate(model, cpu, card.input_size, "turbo")


def test_fold_check_holds_under_reduced_precision_and_still_catches_a_misfold():
    """The check's verdict must not depend on the device's arithmetic: a bf16 model (outputs ~1e-2
    apart between any two evaluation orders) folds; a misfold is refused in bf16 too."""
    from ngt_ray.nets.fold import FOLD_RTOL, fold_error

    torch.manual_seed(0)
    model = GroupTestingModel(build_backbone("efficientnet-lite0"), (4, 6, 8), "tree").eval()
    x = torch.randint(0, 256, (2, 3, 96, 96), dtype=torch.uint8)
    low = copy.deepcopy(model).to(torch.bfloat16)
    folded, count = fold_batchnorm(low, x)
    assert count == 49 and next(folded.parameters()).dtype == torch.bfloat16
    assert fold_error(low, x) < FOLD_RTOL
    with pytest.raises(FoldError, match="float64 on the CPU"):
        fold_batchnorm(_BatchNormFirst().to(torch.bfloat16), torch.randn(2, 4, 8, 8))


def test_fixed_call_shapes_give_the_rows_they_would_unfixed():
    """Calls padded up the ladder, or split at its top, must return exactly the unpadded rows."""
    from ngt_ray.nets.shapes import CallSizes, fix_shapes

    torch.manual_seed(0)
    model = GroupTestingModel(build_backbone("efficientnet-lite0"), (4, 6, 8), "tree").eval()
    x = torch.randint(0, 256, (7, 3, 64, 64), dtype=torch.uint8)
    with torch.no_grad():
        want = model.forward_groups(x, [2, 2, 1, 2])
        ledger = fix_shapes(model, CallSizes.up_to(3, per_image=True))
        got = model.forward_groups(x, [2, 2, 1, 2])
    assert got.shape == want.shape == (4,)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    # 7 images embed as 3 + 3 + (1 padded to 3); 4 groups run as 3 + (1 padded to 1) at every depth
    assert {key[2][0] for key in ledger.seen} == {1, 3}


def test_native_depthwise_wraps_every_depthwise_conv_once_and_changes_nothing():
    from ngt_ray.nets.checkpoint import DEFAULT_INDIVIDUAL_MODEL, load_checkpoint
    from ngt_ray.nets.runtime import NativeDepthwise, native_depthwise

    model, card = load_checkpoint(DEFAULT_INDIVIDUAL_MODEL)
    depthwise = [m for m in model.modules() if isinstance(m, nn.Conv2d) and m.groups == m.in_channels > 1]
    x = torch.randint(0, 256, (3, 3, 96, 96), dtype=torch.uint8)
    with torch.no_grad():
        want = model(x)
        assert native_depthwise(model) == len(depthwise) > 0 and native_depthwise(model) == 0
        got = model(x)
    assert sum(isinstance(m, NativeDepthwise) for m in model.modules()) == len(depthwise)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
