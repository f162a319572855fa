"""What one model call costs on this GPU as the actors make it: the first call of a batch shape, a
repeat, and a new shape, under the runtime levers and their variants (cuDNN or PyTorch's own
depthwise kernel: ``ngt_ray.nets.runtime.NativeDepthwise`` says why). Prints one table. Each
variant meets shapes no earlier variant met, so its first-call column is its own.

    python jobs/gpu_probe.py     # part of jobs/gpu_check.sh
"""

from __future__ import annotations

import copy
import time

import torch

from ngt_ray.nets.checkpoint import DEFAULT_INDIVIDUAL_MODEL, load_checkpoint
from ngt_ray.nets.runtime import NativeDepthwise, accelerate

CUDA = torch.device("cuda")


def _ms(model, n: int, size: int, dtype: torch.dtype | None, channels_last: bool) -> float:
    x = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, device=CUDA)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    torch.cuda.synchronize()
    start = time.perf_counter()
    with torch.inference_mode(), torch.autocast("cuda", dtype=dtype or torch.float32, enabled=dtype is not None):
        model(x).float().cpu()
    return (time.perf_counter() - start) * 1e3


def main() -> None:
    model, card = load_checkpoint(DEFAULT_INDIVIDUAL_MODEL, map_location=CUDA)
    fast, _ = accelerate(model, CUDA, card.input_size, "fast")
    variants = {  # name: (model, autocast dtype, channels-last input, cuDNN on, depthwise outside cuDNN)
        "fast: bf16 CL, native dw": (fast, torch.bfloat16, True, True, True),
        "bf16 CL, cuDNN dw": (fast, torch.bfloat16, True, True, False),
        "fp16 CL, cuDNN dw": (fast, torch.float16, True, True, False),
        "bf16 NCHW, cuDNN dw": (copy.deepcopy(fast).to(memory_format=torch.contiguous_format), torch.bfloat16, False,
                                True, False),
        "fp32 (TF32) CL, cuDNN dw": (fast, None, True, True, False),
        "bf16 CL, cuDNN off": (fast, torch.bfloat16, True, False, False),
    }
    print(f"{'variant':>30} {'new 512':>10} {'repeat':>8} {'new 37':>8} {'repeat':>8} {'new 91':>8}")
    for i, (name, (net, dtype, cl, cudnn, native)) in enumerate(variants.items()):
        NativeDepthwise.enabled = native
        torch.backends.cudnn.enabled = cudnn
        sizes = [512 + i, 512 + i, 37 + i, 37 + i, 91 + i]  # shapes this process has not met yet
        row = [_ms(net, n, card.input_size, dtype, cl) for n in sizes]
        print(f"{name:>30} " + " ".join(f"{v:8.1f}" for v in row))
    torch.backends.cudnn.enabled, NativeDepthwise.enabled = True, True


if __name__ == "__main__":
    main()
