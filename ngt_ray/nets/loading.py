"""The one way the job loads a model: a checkpoint, or its near-zero-compute stand-in.

The planner, the timing task and the model actors all call ``load_model``, so ``--stub-models``
swaps both models everywhere at once and the card (input size, thresholds) always comes with them.
"""

from __future__ import annotations

import torch
from torch import nn

from ngt_ray.nets.checkpoint import ModelCard, load_checkpoint, read_card
from ngt_ray.nets.stubs import StubModel, stub_card

__all__ = ["load_model"]


def load_model(stem: str, *, stub: bool = False,
               map_location: str | torch.device = "cpu") -> tuple[nn.Module, ModelCard]:
    """A checkpoint's model and card, or (``stub``) a stand-in with the card's input size and
    thresholds at the stand-in's decision point; the stand-in never reads the weights."""
    if not stub:
        return load_checkpoint(stem, map_location)
    return StubModel().to(map_location).eval(), stub_card(read_card(stem))
