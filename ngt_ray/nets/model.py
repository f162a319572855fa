"""Binary classifiers that test one image or a whole group of images in one forward pass.

Liang & Zou's three parameter-free ways to merge a group, for any backbone given as stages:

* ``pixel``: the k images are averaged and the whole network runs once per group;
* ``feature``: stages before ``merge_depths[0]`` run on every image, their maps are merged with an
  element-wise max, and the remaining stages run once per group;
* ``tree``: pairwise max at each of several depths (k -> k/2 -> k/4 ...), everything left merged at
  the last depth. Deeper stages see fewer, richer maps.

And one that is no merge at all, the baseline every group screen must beat:

* ``cascade``: the whole network on every image at a low resolution, a head on its pooled features
  (a "group" of k is a max over the members' pooled features, rarely worth it); only what it flags
  is confirmed at full resolution. A 128 px forward costs a third of a 224 px one.

A positive feature anywhere in the group survives the max, so "any positive in the group" stays
detectable while most of the compute is shared by k images. The per-image part (``embed``) is
separate from the group part (``score_groups``) so that retests of sub-groups reuse cached
embeddings and pay only for the shared stages.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ngt_ray.nets.backbone import StagedBackbone

__all__ = ["DESIGNS", "GroupTestingModel", "MergeDesign", "gather", "merge_max", "merge_segments", "register_design"]

@dataclass(frozen=True)
class MergeDesign:
    """Where a group's members are merged and how: one registered object per design."""

    name: str
    reduce: str  # "mean" or "max" over the members (pairs first, at every depth but the last)
    placement: str  # "input": before the first stage; "one": at one depth; "several": increasing depths;
    # "end": after the last stage (pooled features)

    def check(self, depths: tuple[int, ...], n_stages: int) -> None:
        """Raise ``ValueError`` unless ``depths`` suit this design on a backbone of ``n_stages``."""
        if self.placement == "input":
            if depths != (0,):
                raise ValueError(f"{self.name} merge happens before the first stage (merge_at 0), got {depths}")
            return
        if self.placement == "end":
            if depths != (n_stages,):
                raise ValueError(f"{self.name} runs every stage per image (merge_at {n_stages}), got {depths}")
            return
        if not all(0 < d < n_stages for d in depths):
            raise ValueError(f"merge depths must lie in [1, {n_stages - 1}], got {depths}")
        several = self.placement == "several"
        if list(depths) != sorted(set(depths)) or (not several and len(depths) != 1):
            raise ValueError(f"{self.name} merge needs {'increasing depths' if several else 'one depth'}, "
                             f"got {depths}")


DESIGNS: dict[str, MergeDesign] = {}


def register_design(design: MergeDesign) -> MergeDesign:
    """Make a merge design available by its name (to models, cards, the CLI and training)."""
    if design.name in DESIGNS:
        raise ValueError(f"a design named {design.name!r} is already registered")
    DESIGNS[design.name] = design
    return design


register_design(MergeDesign("pixel", "mean", "input"))  # the k images averaged, the whole network per group
register_design(MergeDesign("feature", "max", "one"))  # per-image stages, one max, the rest per group
register_design(MergeDesign("tree", "max", "several"))  # pairwise max at each depth, the rest at the last
register_design(MergeDesign("cascade", "max", "end"))  # no merge: the whole network per image, at a low resolution


def _segments(sizes: Sequence[int], arity: int | None) -> tuple[torch.Tensor, list[int]]:
    """Segment id per row when each run of ``sizes`` rows is merged ``arity`` rows at a time
    (``None``: the whole run), and the sizes of the merged runs (in segments). Vectorised: a batch
    of thousands of groups costs a few array operations."""
    sizes_ = np.asarray(sizes, dtype=np.int64)
    widths = sizes_ if arity is None else np.full_like(sizes_, arity)
    n_seg = -(-sizes_ // widths)
    base = np.cumsum(n_seg) - n_seg
    run = np.repeat(np.arange(len(sizes_)), sizes_)
    offset = np.arange(int(sizes_.sum())) - np.repeat(np.cumsum(sizes_) - sizes_, sizes_)
    return torch.from_numpy(base[run] + offset // widths[run]), n_seg.tolist()


def merge_segments(h: torch.Tensor, sizes: Sequence[int], how: str = "max",
                   arity: int | None = None) -> tuple[torch.Tensor, list[int]]:
    """Merge consecutive rows of ``h``: within each run of ``sizes`` rows, every ``arity`` rows
    (default: the whole run) become one by max or mean. Returns the merged rows and new run sizes."""
    if sum(sizes) != h.shape[0]:
        raise ValueError(f"group sizes sum to {sum(sizes)} but {h.shape[0]} feature maps were given")
    if any(s < 1 for s in sizes):
        raise ValueError(f"group sizes must be >= 1, got {list(sizes)}")
    if arity is None and len(set(sizes)) == 1:  # the common case: one reshape, no scatter
        k = sizes[0]
        grouped = h.reshape(len(sizes), k, *h.shape[1:])
        return (grouped.amax(dim=1) if how == "max" else grouped.mean(dim=1)), [1] * len(sizes)
    seg, new_sizes = _segments(sizes, arity)
    index = seg.to(h.device).view(-1, *[1] * (h.dim() - 1)).expand_as(h)
    out = h.new_zeros((sum(new_sizes), *h.shape[1:]))
    out = out.scatter_reduce(0, index, h, "amax" if how == "max" else "mean", include_self=False)
    return out, new_sizes


def gather(embedded: torch.Tensor, groups: Sequence[Sequence[int]], device: torch.device) -> torch.Tensor:
    """The members' cached embeddings, group after group, as fp32 on ``device``."""
    idx = torch.tensor([j for g in groups for j in g], dtype=torch.long)
    return embedded[idx].to(device).float()


def merge_max(features: torch.Tensor, sizes: Sequence[int]) -> torch.Tensor:
    """Element-wise max over consecutive runs of ``sizes`` rows: one merged map per group."""
    return merge_segments(features, sizes, "max")[0]


class GroupTestingModel(nn.Module):
    """A staged backbone with a one-logit head for the rare class, and a group-merge design.

    ``embed(x)`` runs the per-image stages (uint8 NCHW in); ``score_groups(h, sizes)`` merges
    consecutive runs of embeddings and returns one logit per group; ``forward(x)`` scores images
    one by one (a group of one is the image itself under every design).
    """

    def __init__(self, backbone: StagedBackbone, merge_at: int | Sequence[int], design: str = "feature",
                 head: nn.Module | None = None) -> None:
        super().__init__()
        depths = (merge_at,) if isinstance(merge_at, int) else tuple(merge_at)
        if design not in DESIGNS:
            raise ValueError(f"design must be one of {tuple(DESIGNS)}, got {design!r}")
        DESIGNS[design].check(depths, len(backbone))
        self.backbone = backbone
        self.design = design
        self.merge_depths = depths
        # pooled features to one logit: a linear layer unless given (``ngt_ray.nets.heads``)
        self.head = head if head is not None else nn.Linear(backbone.spec.feature_dim, 1)

    @property
    def merge_at(self) -> int:
        """The first merge depth: stages before it run on every image."""
        return self.merge_depths[0]

    def shared_modules(self, first: int | None = None) -> list[nn.Module]:
        """The modules a group test runs once per group: stages from ``first`` (default: the first
        merge depth) and the head. What fine-tuning trains, pruning prunes and a checkpoint stores."""
        first = self.merge_at if first is None else first
        return [*self.backbone.stages[first:], self.head]

    def shared_state_keys(self, first: int | None = None) -> list[str]:
        """State-dict keys of ``shared_modules(first)``."""
        first = self.merge_at if first is None else first
        return [key for key in self.state_dict() if key.startswith("head.")
                or (key.startswith("backbone.stages.") and int(key.split(".")[2]) >= first)]

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Per-image stages ``[0, merge_at)`` (for pixel merge: the normalised pixels)."""
        return self.backbone.forward_range(x, 0, self.merge_at)

    def score_groups(self, h: torch.Tensor, sizes: Sequence[int]) -> torch.Tensor:
        """One logit per group from the members' embeddings (consecutive runs of ``sizes`` rows)."""
        return self.head(self.group_features(h, sizes)).squeeze(1)

    def group_features(self, h: torch.Tensor, sizes: Sequence[int]) -> torch.Tensor:
        """Pooled features of each group, for training heads on cached embeddings."""
        how = DESIGNS[self.design].reduce
        depths = self.merge_depths
        for i, depth in enumerate(depths):
            last = i == len(depths) - 1
            h, sizes = merge_segments(h, sizes, how, arity=None if last else 2)
            h = self.backbone.forward_range(h, depth, len(self.backbone) if last else depths[i + 1])
        return h

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.score_groups(self.embed(x), [1] * x.shape[0])

    def forward_groups(self, x: torch.Tensor, sizes: Sequence[int]) -> torch.Tensor:
        return self.score_groups(self.embed(x), sizes)
