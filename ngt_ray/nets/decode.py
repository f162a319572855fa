"""Bytes to model-sized uint8 pixels, one image at a time, never raising, in bounded memory.

Moderation must account for every object, so a failed decode is returned as an error string and
becomes an error row downstream instead of failing a whole Ray block. Errors are written for
people: they say what is wrong with the object (the row's uri names it), never quote a memory
address or a URL's query string.

Memory is bounded for any image, not only for photos of the usual size:

* an object over ``MAX_OBJECT_BYTES`` (64 MiB) is refused unread (``ngt_ray.storage``);
* an image over ``MAX_PIXELS`` (64 Mpx, e.g. 9200x6900) is refused from its header, before any
  pixel is decoded. The limit is strict (Pillow itself only warns below twice its limit) and holds
  for every format, JPEG included: progressive JPEGs and all other formats decode at full size;
* a JPEG is decoded at reduced size by the DCT (Pillow's draft mode); any other image is decoded
  at full size, then box-reduced by an integer factor before the colour conversion, so no
  full-size copy is made after the decode.

So one image costs at most 6 bytes per source pixel while it is decoded (a progressive 4:4:4
JPEG's coefficients; 4 for any other image, which is decoded at 4 bytes per pixel and converted a
strip at a time): under 400 MiB at the limit (``MAX_DECODE_BYTES``), a usual photo a few MiB.
"""

from __future__ import annotations

import contextlib
import io
import math
import struct
import warnings
from collections.abc import Collection

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from ngt_ray.errors import ErrorKind, RowError
from ngt_ray.storage import MAX_OBJECT_BYTES, object_too_large, redact

__all__ = ["MAX_DECODE_BYTES", "MAX_OBJECT_BYTES", "MAX_PIXELS", "decode_image", "decode_many", "decode_on_device"]

MAX_PIXELS = 64_000_000
# The most memory one decode takes: a progressive 4:4:4 JPEG at the pixel limit keeps 2-byte
# coefficients of 3 full-size components, 6 bytes a pixel (371 MiB measured at 8000x8000); any other
# image takes 4 and its decoder's buffers (277 MiB for an 8000x8000 RGBA PNG).
MAX_DECODE_BYTES = 6 * MAX_PIXELS + 32 * 2**20
# Pillow's own check at open: above this it warns (an error here), above twice this it refuses.
Image.MAX_IMAGE_PIXELS = MAX_PIXELS
# source elements resized in one call on the device (64M: 256 MB of float32 at a time)
_RESIZE_ELEMENTS = 2**26
# modes Image.reduce averages as they are (a palette's indices, 16-bit and alpha modes are converted first)
_REDUCIBLE = frozenset({"L", "RGB", "CMYK", "I", "F"})
_STRIP_PIXELS = 2**22  # source pixels converted at a time where the mode needs converting (16 MiB of RGBA)


def _pixels_error(width: int, height: int) -> RowError | None:
    """The error for an image of ``width`` x ``height`` over ``MAX_PIXELS``; None when it fits."""
    if width * height <= MAX_PIXELS:
        return None
    return RowError(ErrorKind.TOO_LARGE, f"too large: image is {width}x{height} ({width * height / 1e6:.0f} Mpx), "
                                         f"over the {MAX_PIXELS / 1e6:.0f} Mpx limit")


def _header_size(data: bytes) -> tuple[int, int] | None:
    """An image's size from its header alone, without Pillow's bomb check (which refused it and
    so did not say the size): each registered format's reader, which parses only the header."""
    Image.init()
    for fmt in Image.ID:
        factory, accept = Image.OPEN[fmt]
        if accept is not None and not accept(data[:16]):
            continue
        with contextlib.suppress(Exception):  # a format that does not fit: try the next
            return factory(io.BytesIO(data), "").size
    return None


def _reason(exc: BaseException) -> RowError:
    """A decode failure for people: Pillow's reason without the object's repr in it."""
    if isinstance(exc, UnidentifiedImageError):
        return RowError(ErrorKind.DECODE, "decode failed: not an image Pillow can read")
    text = redact(str(exc)).strip()
    if isinstance(exc, OSError) and "truncated" in text:
        return RowError(ErrorKind.DECODE, "decode failed: the image is truncated")
    return RowError(ErrorKind.DECODE, f"decode failed: {type(exc).__name__}: {text}"[:500])


def _convertible(img: Image.Image) -> Image.Image:
    """``img`` in a mode ``Image.reduce`` averages as it is: alpha dropped (as ``convert("RGB")``
    drops it), a palette mapped, 16-bit grey to its top 8 bits (``convert`` would clip it to white)."""
    if img.mode.startswith("I;16"):
        return Image.fromarray((np.asarray(img) >> 8).astype(np.uint8))
    return img.convert("L" if img.mode in ("LA", "La", "1") else "RGB")


def _reduced(img: Image.Image, size: int) -> Image.Image:
    """``img`` decoded, then shrunk by whole factors while both sides stay at least twice ``size``
    (a box filter: the antialiased resize after it sees the same detail), as RGB.

    Modes that need converting first are converted and reduced a strip at a time: a full-size
    converted copy would double the memory of the decode.
    """
    img.load()
    factor = (max(1, img.width // (2 * size)), max(1, img.height // (2 * size)))
    if img.mode in _REDUCIBLE:
        small = img.reduce(factor) if factor != (1, 1) else img
        return small if small.mode == "RGB" else small.convert("RGB")
    step = factor[1] * max(1, _STRIP_PIXELS // (img.width * factor[1]))
    small = None
    for top in range(0, img.height, step):
        strip = _convertible(img.crop((0, top, img.width, min(img.height, top + step))))
        strip = strip.reduce(factor) if factor != (1, 1) else strip
        if small is None:
            small = Image.new(strip.mode, (-(-img.width // factor[0]), -(-img.height // factor[1])))
        small.paste(strip, (0, top // factor[1]))
    return small if small.mode == "RGB" else small.convert("RGB")


def _decode_rgb(data: bytes | None, size: int) -> tuple[np.ndarray | None, RowError | None]:
    """Decode ``data`` to an RGB ``(size, size, 3)`` uint8 array (HWC, as Pillow lays it out)."""
    if not data:
        return None, RowError(ErrorKind.DECODE, "empty object")
    if (too_large := object_too_large(len(data))) is not None:
        return None, too_large
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)  # strict: refuse, do not warn
            with Image.open(io.BytesIO(data)) as img:
                if img.format == "JPEG":
                    img.draft("RGB", (size, size))
                rgb = np.array(_reduced(img, size), dtype=np.uint8)
        if rgb.shape[:2] != (size, size):
            rgb = _resize_hwc(rgb, size)
        return rgb, None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        size_found = _header_size(data)
        return None, (_pixels_error(*size_found) if size_found else None) or \
            RowError(ErrorKind.TOO_LARGE, f"too large: the image is over the {MAX_PIXELS / 1e6:.0f} Mpx limit")
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError, struct.error) as exc:
        return None, _reason(exc)


def _resize_hwc(rgb: np.ndarray, size: int) -> np.ndarray:
    """(H, W, 3) uint8 to (size, size, 3): antialiased bilinear, as Pillow's resize, by torch's uint8
    kernel, which takes ~half of Pillow's time (the resize was a third of a decode task's CPU)."""
    x = torch.from_numpy(rgb).permute(2, 0, 1)[None]
    out = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return out[0].permute(1, 2, 0).contiguous().numpy()


def decode_image(data: bytes | None, size: int) -> tuple[np.ndarray | None, RowError | None]:
    """Decode ``data`` to an RGB ``(3, size, size)`` uint8 array, or return ``(None, reason)``.

    JPEGs larger than the target are decoded at reduced size by the DCT (Pillow's draft mode), which
    is several times cheaper than a full decode followed by a resize. The whole image is squashed to
    a square rather than cropped, so nothing at the borders escapes moderation.
    """
    arr, err = _decode_rgb(data, size)
    return (None, err) if arr is None else (arr.transpose(2, 0, 1).copy(), None)


def decode_many(blobs: Collection[bytes | None], size: int,
                channels_last: bool = False) -> tuple[np.ndarray, list[RowError | None]]:
    """Decode a batch; failed images are zero-filled in the array and named in the error list.

    ``blobs`` is iterated once, in order, so it may produce each image's bytes only when asked
    (the decode tasks read them one at a time from an Arrow column: one encoded image in memory).

    ``channels_last`` returns ``(N, size, size, 3)``, Pillow's own layout, with no transposing copy:
    the model actors permute it on their device, where NHWC memory is what channels-last
    convolutions want anyway. Otherwise ``(N, 3, size, size)``.
    """
    pixels = np.zeros((len(blobs), size, size, 3), dtype=np.uint8)
    errors: list[RowError | None] = []
    for i, blob in enumerate(blobs):
        arr, err = _decode_rgb(blob, size)
        if arr is not None:
            pixels[i] = arr
        errors.append(err)
    return (pixels if channels_last else np.ascontiguousarray(pixels.transpose(0, 3, 1, 2))), errors


def _is_jpeg(blob: bytes | None) -> bool:
    return bool(blob) and blob[:3] == b"\xff\xd8\xff"


# start-of-frame markers, which carry the image's size (not DHT 0xC4, JPG 0xC8, DAC 0xCC)
_SOF = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})


def _jpeg_size(blob: bytes) -> tuple[int, int] | None:
    """Width and height from a JPEG's frame header, a few markers in (microseconds: the batched
    device decoder is checked against the pixel limit without opening every image in Pillow)."""
    i = 2
    while i + 9 <= len(blob):
        if blob[i] != 0xFF:
            return None
        marker = blob[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
        elif marker in _SOF:
            height, width = struct.unpack(">HH", blob[i + 5 : i + 9])
            return width, height
        elif marker == 0x01 or 0xD0 <= marker <= 0xD8:  # markers without a length
            i += 2
        elif marker == 0xD9:  # the end of the image, and no frame
            return None
        else:
            i += 2 + struct.unpack(">H", blob[i + 2 : i + 4])[0]
    return None


def _fits(blob: bytes) -> bool:
    """Whether a JPEG is within both limits as far as its size and frame header tell."""
    size = _jpeg_size(blob)
    return object_too_large(len(blob)) is None and (size is None or _pixels_error(*size) is None)


def _resize(images: torch.Tensor, size: int) -> torch.Tensor:
    """(N, 3, H, W) uint8 to (N, 3, size, size) uint8, bilinear with antialiasing (as Pillow's reduce)."""
    if images.shape[-2:] == (size, size):
        return images
    out = torch.nn.functional.interpolate(images.float(), size=(size, size), mode="bilinear",
                                          antialias=True, align_corners=False)
    return out.round_().clamp_(0, 255).to(torch.uint8)


def _resize_into(pixels: torch.Tensor, decoded: dict[int, torch.Tensor], size: int) -> None:
    """Resize every decoded image into its row of ``pixels``: one call per distinct source shape,
    so a bucket of same-sized photos costs a handful of kernel launches, not a few per image."""
    by_shape: dict[tuple[int, ...], list[int]] = {}
    for i, image in decoded.items():
        by_shape.setdefault(tuple(image.shape), []).append(i)
    for shape, rows in by_shape.items():
        step = max(1, _RESIZE_ELEMENTS // math.prod(shape))  # bounded memory for large photos
        for j in range(0, len(rows), step):
            chunk = rows[j : j + step]
            pixels[chunk] = _resize(torch.stack([decoded[i] for i in chunk]), size)


def decode_on_device(blobs: list[bytes | None], size: int,
                     device: torch.device) -> tuple[torch.Tensor, list[RowError | None]]:
    """Decode a batch where the model runs: JPEGs in one batched call (nvJPEG on CUDA), resized there.

    Non-JPEG objects, and any JPEG the batched decoder rejects, fall back one by one to the CPU
    decoder above, so a bad image is an error row and never fails the batch; so do JPEGs over
    either limit, which it refuses from their header. Returns uint8 ``(N, 3, size, size)`` on
    ``device`` (failed rows zero-filled) and the per-image errors.
    """
    from torchvision.io import ImageReadMode, decode_jpeg

    pixels = torch.zeros((len(blobs), 3, size, size), dtype=torch.uint8, device=device)
    errors: list[RowError | None] = [None] * len(blobs)
    jpegs = [i for i, b in enumerate(blobs) if _is_jpeg(b) and _fits(b)]
    decoded: dict[int, torch.Tensor] = {}
    if jpegs:
        data = [torch.frombuffer(bytearray(blobs[i]), dtype=torch.uint8) for i in jpegs]
        try:
            decoded = dict(zip(jpegs, decode_jpeg(data, mode=ImageReadMode.RGB, device=device)))
        except RuntimeError:  # one bad image fails the batched call: find it one by one
            for i, d in zip(jpegs, data):
                with contextlib.suppress(RuntimeError):  # left to the CPU fallback below
                    decoded[i] = decode_jpeg(d, mode=ImageReadMode.RGB, device=device)
    _resize_into(pixels, decoded, size)
    for i, blob in enumerate(blobs):
        if i in decoded:
            continue
        arr, errors[i] = decode_image(blob, size)  # CPU fallback: other formats, odd JPEGs
        if arr is not None:
            pixels[i] = torch.from_numpy(arr).to(device)
    return pixels, errors
