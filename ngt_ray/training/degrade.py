"""Degraded copies of photos: dark, flat, blurred, grey, low-resolution, heavily compressed.

Photos of guns in the wild are CCTV frames, movie stills and news grabs: dark, soft and blocky.
A head fitted on clean web photos reads that look itself as evidence: on degraded copies of the
firearm manifest's test split, the clean-trained model flagged many everyday scenes at its
threshold. Degraded copies of a third of the training photos, with their labels, flagged far fewer
and ranked degraded in-scene photos better, at no cost on clean photos; degrading every photo cost
clean AUROC and was not chosen. Copies are made at the model's
input size and travel as JPEG bytes, like the copy-paste composites, so the trainer's embedding
path reads them as any other image.
"""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter

from ngt_ray.nets.decode import decode_image
from ngt_ray.training.labelled import LabelledImage, read_image_bytes

__all__ = ["degrade", "degraded_copies"]


def degrade(pixels: np.ndarray, rng: np.random.Generator) -> bytes:
    """One degraded JPEG of an ``(H, W, 3)`` uint8 image: darker (x0.25-0.6), flatter (contrast
    x0.5-0.9), blurred (sigma 0.5-1.5 px), half the time grey and half the time at half resolution,
    saved at JPEG quality 15-40."""
    img = Image.fromarray(pixels)
    img = ImageEnhance.Brightness(img).enhance(rng.uniform(0.25, 0.6))
    img = ImageEnhance.Contrast(img).enhance(rng.uniform(0.5, 0.9))
    if rng.random() < 0.5:
        img = img.convert("L").convert("RGB")
    img = img.filter(ImageFilter.GaussianBlur(rng.uniform(0.5, 1.5)))
    if rng.random() < 0.5:
        img = img.resize((img.width // 2, img.height // 2), Image.Resampling.BILINEAR).resize(
            img.size, Image.Resampling.BILINEAR)
    out = io.BytesIO()
    img.save(out, "JPEG", quality=int(rng.integers(15, 40)))
    return out.getvalue()


def degraded_copies(items: Sequence[LabelledImage], fraction: float, size: int,
                    rng: np.random.Generator) -> list[LabelledImage]:
    """Degraded copies (as JPEG bytes at ``size``) of a random ``fraction`` of ``items``, labels kept."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"the degraded fraction must lie in [0, 1], got {fraction}")
    picked = [item for item in items if rng.random() < fraction]
    copies = []
    for src, label in picked:
        arr, err = decode_image(read_image_bytes(src), size)
        if arr is None:
            raise ValueError(f"image {src} failed to decode: {err}")
        copies.append((degrade(arr.transpose(1, 2, 0), rng), label))
    return copies
