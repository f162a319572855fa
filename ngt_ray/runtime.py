"""Device choice, the inference context, and the runtime levers every model gets.

Compression only pays once the runtime exploits it: on a GPU a pruned network is memory- and
launch-bound unless batch norm is folded away, activations are channels-last bf16, and small
kernels are fused and replayed (torch.compile; CUDA graphs for repeated shapes). One switch,
``runtime``, turns them on together, with the CPU taking the levers that are exact and free there:

* ``eager``: the model as loaded;
* ``fast`` (default): batch norm folded into convolutions (checked exact), and on CUDA
  channels-last memory format and bf16 autocast;
* ``compiled``: ``fast`` plus ``torch.compile`` of every stage, with CUDA graphs on a GPU
  (``mode="reduce-overhead"``, one graph per batch shape the job meets).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from ngt_ray.fold import fold_batchnorm

__all__ = ["RUNTIMES", "accelerate", "inference_context", "pick_device"]

RUNTIMES = ("eager", "fast", "compiled")


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


def accelerate(model: nn.Module, device: torch.device, input_size: int,
               runtime: str = "fast") -> tuple[nn.Module, dict[str, object]]:
    """``model`` (already on ``device``) with the levers of ``runtime`` applied, and what was applied.

    The batch-norm fold is verified on a random uint8 batch at ``input_size`` and refused
    (``FoldError``) if it changes the output by more than 1e-4 relative.
    """
    if runtime not in RUNTIMES:
        raise ValueError(f"runtime must be one of {RUNTIMES}, got {runtime!r}")
    applied: dict[str, object] = {"runtime": runtime}
    if runtime == "eager":
        return model, applied
    example = torch.randint(0, 256, (2, 3, input_size, input_size), dtype=torch.uint8, device=device)
    model, applied["folded_batchnorms"] = fold_batchnorm(model.eval(), example)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
        applied["channels_last"] = applied["bf16"] = True
    if runtime == "compiled":
        mode = "reduce-overhead" if device.type == "cuda" else "default"
        for stage in model.backbone.stages:
            stage.compile(mode=mode)
        applied["compile_mode"] = mode
    return model, applied
