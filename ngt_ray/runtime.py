"""Device choice and inference context shared by training, the actors and the benchmarks."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

__all__ = ["inference_context", "pick_device"]


def pick_device(preference: str = "auto") -> torch.device:
    """``auto`` takes the GPU when one is visible, otherwise the CPU."""
    if preference == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(preference)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was asked for but no CUDA device is visible")
    return device


@contextlib.contextmanager
def inference_context(device: torch.device) -> Iterator[None]:
    """No autograd, and bf16 autocast on CUDA (fp32 on CPU, where bf16 is slower than it saves)."""
    with torch.inference_mode():
        if device.type == "cuda":
            with torch.autocast("cuda", dtype=torch.bfloat16):
                yield
        else:
            yield
