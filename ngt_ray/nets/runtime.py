"""Device choice, the inference context, and the runtime levers every model gets.

Compression only pays once the runtime exploits it: on a GPU a pruned network is memory- and
launch-bound unless batch norm is folded away, activations are channels-last bf16, and small
kernels are fused and replayed (torch.compile; CUDA graphs for repeated shapes). One switch,
``runtime``, turns them on together, with the CPU taking the levers that are exact and free there:

* ``eager``: the model as loaded;
* ``fast`` (default): batch norm folded into convolutions (checked exact), and on CUDA
  channels-last memory format, bf16 autocast, batches padded to a few sizes, and depthwise
  convolutions run by PyTorch's own kernel rather than cuDNN (see ``NativeDepthwise``);
* ``compiled``: ``fast`` plus ``torch.compile`` of every stage, with CUDA graphs on a GPU
  (``mode="reduce-overhead"``, one graph per batch shape the job meets).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from ngt_ray.nets.fold import fold_batchnorm

__all__ = ["RUNTIMES", "NativeDepthwise", "accelerate", "inference_context", "native_depthwise", "pick_device"]

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
    backbone = getattr(model, "backbone", None)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
        applied["channels_last"] = applied["bf16"] = True
        if backbone is not None:  # a few batch shapes, not one per call (see backbone.padded_batch)
            backbone.pad_batches = applied["padded_batches"] = True
        applied["native_depthwise"] = native_depthwise(model)
    if runtime == "compiled" and backbone is not None:
        mode = "reduce-overhead" if device.type == "cuda" else "default"
        for i, stage in enumerate(backbone.stages):
            backbone.stages[i] = _CompiledStage(stage, mode)
        applied["compile_mode"] = mode
    return model, applied


class NativeDepthwise(nn.Module):
    """A depthwise convolution run by PyTorch's own CUDA kernel instead of cuDNN.

    On an H200 (torch 2.11, cuDNN 9) a model call with a batch shape the process had not met cost
    about 1.9 s of CPU against 5-28 ms for a repeat (``jobs/gpu_probe.py``); cuDNN 9 is reported
    to compile depthwise execution plans at run time, and EfficientNet-Lite's blocks are built
    around depthwise convolutions, while group testing meets new batch shapes in almost every
    round. PyTorch's native depthwise kernel needs no plan. This lever has not run on a GPU yet:
    ``enabled = False`` hands the layers back to cuDNN, and the probe measures both.
    """

    enabled = True

    def __init__(self, conv: nn.Module) -> None:
        super().__init__()
        self.conv = conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.enabled and x.is_cuda):
            return self.conv(x)
        with torch.backends.cudnn.flags(enabled=False):
            return self.conv(x)


def native_depthwise(model: nn.Module) -> int:
    """Wrap every depthwise convolution of ``model`` in ``NativeDepthwise``; returns how many."""
    sites = [(parent, name, child) for parent in model.modules() if not isinstance(parent, NativeDepthwise)
             for name, child in parent.named_children()
             if isinstance(child, nn.Conv2d) and child.groups > 1 and child.groups == child.in_channels]
    for parent, name, child in sites:
        setattr(parent, name, NativeDepthwise(child))
    return len(sites)


class _CompiledStage(nn.Module):
    """One stage under ``torch.compile``. With CUDA graphs (``reduce-overhead``) a graph's output
    lives in memory its next replay overwrites, and a group-testing round replays the same stage
    while earlier outputs (the cached embeddings) are still in use: each call starts a new graph
    step and hands back its own copy of the output."""

    def __init__(self, stage: nn.Module, mode: str) -> None:
        super().__init__()
        self.stage = stage
        # static shapes: batches come padded to a few sizes, so one graph per size beats a symbolic
        # one (the first GPU run recompiled symbolically for two minutes)
        self.compiled = torch.compile(stage, mode=mode, dynamic=False)
        self.graphs = mode == "reduce-overhead"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.graphs:
            return self.compiled(x)
        torch.compiler.cudagraph_mark_step_begin()
        return self.compiled(x).clone()
