"""Stand-in models with the real models' inputs and outputs and almost no compute.

``ngt-ray benchmark --stub-models`` swaps both models for these, so that everything that is not
the model (reading, decoding, batching, moving pixels, the group-testing bookkeeping, writing)
shows up on a CPU as it would in front of a GPU. The stand-ins behave like a screen: an image is
"positive" when a checksum of its pixels falls in a ``rate`` slice, a group's score is the max of
its members', so groups, halving rounds and confirmations happen at a realistic rate, all at a
few operations per pixel.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import torch
from torch import nn

from ngt_ray.nets.checkpoint import ModelCard
from ngt_ray.nets.model import merge_segments
from ngt_ray.nets.shapes import ShapeLedger

__all__ = ["StubModel", "stub_card"]

STUB_THRESHOLD = 0.5


class StubModel(nn.Module):
    """``embed`` (uint8 NCHW in), ``score_groups`` and ``forward`` as ``GroupTestingModel`` has them."""

    def __init__(self, rate: float = 0.01, modulus: int = 9973) -> None:
        super().__init__()
        self.rate, self.modulus = rate, modulus
        self.scale = nn.Parameter(torch.ones(1), requires_grad=False)  # gives the module a device and dtype
        self.shapes: ShapeLedger | None = None  # as a staged backbone's: its calls pass here

    def _call(self, fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, stage: int) -> torch.Tensor:
        return fn(x) if self.shapes is None else self.shapes.call(fn, x, (stage, stage + 1))

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """One value per image, in [0, 1): a checksum of a sparse pixel grid (cheap on any device)."""
        return self._call(self._checksum, x, 0)

    def _checksum(self, x: torch.Tensor) -> torch.Tensor:
        checksum = x[:, :, ::16, ::16].to(torch.int64).sum(dim=(1, 2, 3)) % self.modulus
        return (checksum.float() / self.modulus).reshape(-1, 1, 1, 1) * self.scale

    def score_groups(self, h: torch.Tensor, sizes: Sequence[int]) -> torch.Tensor:
        """Logit > 0 exactly when some member's value falls in the top ``rate`` slice."""
        merged = merge_segments(h, sizes, "max")[0]
        return self._call(lambda m: (m.reshape(-1) - (1.0 - self.rate)) * 1e3, merged, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.score_groups(self.embed(x), [1] * x.shape[0])


def stub_card(card: ModelCard) -> ModelCard:
    """The real card with every threshold at the stand-in's decision point (sigmoid(0) = 0.5)."""
    calibration = {size: dataclasses.replace(row, threshold=STUB_THRESHOLD) for size, row in card.calibration.items()}
    return dataclasses.replace(card, threshold=STUB_THRESHOLD, calibration=calibration)

