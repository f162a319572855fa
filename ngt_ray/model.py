"""Binary classifiers that test one image or a whole group of images in one forward pass.

Liang & Zou's feature merge: the stages before ``merge_at`` run on every image, their outputs are
merged over the group with an element-wise max, and the stages after run once per group. A positive
feature anywhere in the group survives the max, so "any positive in the group" stays detectable
while the late stages, most of the compute, are shared by k images.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ngt_ray.backbone import StagedBackbone

__all__ = ["GroupTestingModel", "merge_max"]


def merge_max(features: torch.Tensor, sizes: Sequence[int]) -> torch.Tensor:
    """Element-wise max over consecutive runs of ``sizes`` rows: one merged map per group."""
    if sum(sizes) != features.shape[0]:
        raise ValueError(f"group sizes sum to {sum(sizes)} but {features.shape[0]} feature maps were given")
    if len(set(sizes)) == 1:
        k = sizes[0]
        return features.view(len(sizes), k, *features.shape[1:]).amax(dim=1)
    return torch.stack([chunk.amax(dim=0) for chunk in torch.split(features, list(sizes))])


class GroupTestingModel(nn.Module):
    """A staged backbone with a one-logit head for the rare class.

    ``forward(x)`` scores images one by one (the individual model); ``forward_groups(x, sizes)``
    scores consecutive groups of images, merging after stage ``merge_at``. Inputs are uint8 NCHW.
    """

    def __init__(self, backbone: StagedBackbone, merge_at: int) -> None:
        super().__init__()
        if not 0 < merge_at < len(backbone):
            raise ValueError(f"merge_at must lie in [1, {len(backbone) - 1}], got {merge_at}")
        self.backbone = backbone
        self.merge_at = merge_at
        self.head = nn.Linear(backbone.spec.feature_dim, 1)

    def early(self, x: torch.Tensor) -> torch.Tensor:
        """Per-image stages ``[0, merge_at)``."""
        return self.backbone.forward_range(x, 0, self.merge_at)

    def late(self, h: torch.Tensor) -> torch.Tensor:
        """Stages ``[merge_at, end)`` and the head: one logit per row of ``h``."""
        return self.head(self.backbone.forward_range(h, self.merge_at, len(self.backbone))).squeeze(1)

    def features(self, h: torch.Tensor) -> torch.Tensor:
        """Pooled features after the late stages, for training heads on cached activations."""
        return self.backbone.forward_range(h, self.merge_at, len(self.backbone))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.late(self.early(x))

    def forward_groups(self, x: torch.Tensor, sizes: Sequence[int]) -> torch.Tensor:
        return self.late(merge_max(self.early(x), sizes))
