"""Bytes to model-sized uint8 pixels, one image at a time, never raising.

Moderation must account for every object, so a failed decode is returned as an error string and
becomes an error row downstream instead of failing a whole Ray block.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, UnidentifiedImageError

__all__ = ["decode_image", "decode_many"]

# Decompression bombs are an error row, not an out-of-memory actor.
Image.MAX_IMAGE_PIXELS = 64_000_000


def decode_image(data: bytes | None, size: int) -> tuple[np.ndarray | None, str | None]:
    """Decode ``data`` to an RGB ``(3, size, size)`` uint8 array, or return ``(None, reason)``.

    JPEGs larger than the target are decoded at reduced size by the DCT (Pillow's draft mode), which
    is several times cheaper than a full decode followed by a resize. The whole image is squashed to
    a square rather than cropped, so nothing at the borders escapes moderation.
    """
    if not data:
        return None, "empty object"
    try:
        with Image.open(io.BytesIO(data)) as img:
            if img.format == "JPEG":
                img.draft("RGB", (size, size))
            rgb = img.convert("RGB")
            if rgb.size != (size, size):
                rgb = rgb.resize((size, size), Image.Resampling.BILINEAR, reducing_gap=None)
            return np.asarray(rgb, dtype=np.uint8).transpose(2, 0, 1).copy(), None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        return None, f"decode failed: {type(exc).__name__}: {exc}"[:500]


def decode_many(blobs: list[bytes | None], size: int) -> tuple[np.ndarray, list[str | None]]:
    """Decode a batch; failed images are zero-filled in the array and named in the error list."""
    pixels = np.zeros((len(blobs), 3, size, size), dtype=np.uint8)
    errors: list[str | None] = []
    for i, blob in enumerate(blobs):
        arr, err = decode_image(blob, size)
        if arr is not None:
            pixels[i] = arr
        errors.append(err)
    return pixels, errors
