"""Device choice, the inference context, and the runtime levers every model gets.

Compression only pays once the runtime exploits it: on a GPU a pruned network is memory- and
launch-bound unless batch norm is folded away, activations are channels-last bf16, and small
kernels are fused and replayed (torch.compile; CUDA graphs for repeated shapes). One switch,
``runtime``, turns them on together, with the CPU taking the levers that are exact and free there:

* ``eager``: the model as loaded;
* ``fast`` (default): batch norm folded into convolutions (checked exact), and on CUDA
  channels-last memory format, bf16 autocast, and depthwise convolutions run by PyTorch's own
  kernel rather than cuDNN (see ``NativeDepthwise``);
* ``compiled``: ``fast`` plus ``torch.compile`` of every stage with static shapes, with CUDA graphs
  on a GPU (``mode="reduce-overhead"``): one graph per shape of the closed set the job's plan
  fixes (``ngt_ray.nets.shapes``), all compiled while the actor warms up.

Batch shapes are not a lever here: the plan decides them, and ``ngt_ray.nets.shapes`` holds a
model's calls to them.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from ngt_ray.nets.fold import fold_batchnorm

__all__ = ["RUNTIMES", "NativeDepthwise", "accelerate", "compile_cache_hits", "inference_context", "native_depthwise",
           "pick_device", "share_compile_cache"]

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
        applied["native_depthwise"] = native_depthwise(model)
    if runtime == "compiled" and backbone is not None:
        mode = "reduce-overhead" if device.type == "cuda" else "default"
        share_compile_cache()
        for i, stage in enumerate(backbone.stages):
            backbone.stages[i] = _CompiledStage(stage, mode)
        applied["compile_mode"] = mode
    return model, applied


# One graph per stage and shape of the closed set: a ladder of a few dozen shapes must never fall
# back to eager because dynamo's default limit (8 graphs per frame) ran out.
_RECOMPILE_LIMIT = 64


def share_compile_cache() -> Path:
    """Point Inductor's on-disk cache (compiled graphs and kernels) at one folder per node, shared by
    every actor there, so the second actor loads what the first compiled instead of compiling again
    (Lite0's 8 stages at 8 shapes: 103 s to compile on 2 CPU cores, 6.7 s to load). A folder given
    in ``TORCHINDUCTOR_CACHE_DIR`` is kept."""
    import torch._dynamo.config

    folder = Path(os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR",
                                        str(Path(tempfile.gettempdir()) / "ngt-ray-compile-cache")))
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, _RECOMPILE_LIMIT)
    return folder


def compile_cache_hits() -> int:
    """Graphs this process loaded from the compile cache rather than compiled (Inductor's counter)."""
    from torch._dynamo.utils import counters

    return int(counters["inductor"].get("fxgraph_cache_hit", 0))


class NativeDepthwise(nn.Module):
    """A depthwise convolution run by PyTorch's own CUDA kernel instead of cuDNN.

    A model call with a batch shape a process has not met costs seconds of CPU on a GPU node, a
    repeat milliseconds (``jobs/gpu_probe.py`` measures both): cuDNN 9 is reported to compile
    depthwise execution plans at run time, and EfficientNet-Lite's blocks are built around
    depthwise convolutions. PyTorch's native depthwise kernel needs no plan. ``enabled = False``
    hands the layers back to cuDNN, and the probe measures both.
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
