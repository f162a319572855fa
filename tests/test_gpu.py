"""On a CUDA device: the runtime levers, on-device decode and the model actor, as the job runs them.

Skipped without CUDA (see conftest); ``jobs/gpu_check.sh`` runs them on a GPU node.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from ngt_ray.nets.checkpoint import DEFAULT_INDIVIDUAL_MODEL, default_screen_model, load_checkpoint
from ngt_ray.nets.decode import decode_many, decode_on_device
from ngt_ray.nets.runtime import accelerate, inference_context
from ngt_ray.training.datasets import caltech_split

pytestmark = pytest.mark.gpu
CUDA = torch.device("cuda")


@pytest.mark.parametrize("stem", [default_screen_model(), DEFAULT_INDIVIDUAL_MODEL])
def test_fast_runtime_folds_on_cuda_with_tf32_on(stem):
    torch.backends.cudnn.allow_tf32 = True  # cuDNN's default: the fold check must not depend on it
    model, card = load_checkpoint(stem, map_location=CUDA)
    fast, applied = accelerate(model, CUDA, card.input_size, "fast")
    assert applied["folded_batchnorms"] > 0 and applied["bf16"] and applied["channels_last"]
    x = torch.randint(0, 256, (8, 3, card.input_size, card.input_size), dtype=torch.uint8, device=CUDA)
    with inference_context(CUDA):
        got = torch.sigmoid(fast.forward_groups(x, [2, 2, 4]).float())
    with torch.no_grad():
        want = torch.sigmoid(model.cpu().double().forward_groups(x.cpu(), [2, 2, 4]))
    assert (got.cpu().double() - want).abs().max() < 0.05  # bf16 through the whole network


def test_device_decode_on_cuda_matches_cpu_decode(caltech):
    blobs = []
    for path, _ in caltech_split(caltech, "test")[::50][:16]:
        if path.stat().st_size:
            buf = io.BytesIO()
            Image.open(path).convert("RGB").resize((500, 375)).save(buf, "JPEG", quality=90)
            blobs.append(buf.getvalue())
    pixels, errors = decode_on_device([*blobs, b"", b"\xff\xd8\xffjunk"], 160, CUDA)
    assert pixels.device.type == "cuda" and errors[: len(blobs)] == [None] * len(blobs)
    assert errors[-2].message == "empty object" and errors[-1]
    reference, _ = decode_many(blobs, 160)
    assert np.abs(pixels[: len(blobs)].cpu().numpy().astype(np.int16) - reference.astype(np.int16)).mean() < 3.0
