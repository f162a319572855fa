"""Copy-paste augmentation: firearm cut-outs pasted into everyday scenes.

Real photos of the rare class in real scenes are few, and most licensed firearm photos are
product shots on plain backgrounds. Detection work makes scene positives from such shots by cutting
the object out and pasting it, small, scaled, lit and blurred at random, into negative scenes
(Dwibedi et al., 2017; Ghiasi et al., 2021). A model trained only on whole product shots learns
"white background" as much as "gun"; pasted into kitchens and streets, the gun is the only thing
that differs from the negatives, and it is small, as it is in CCTV frames and news photos.

The cut-out needs no segmentation model: a photo whose border is one flat colour is a product shot,
and the pixels far from that colour are the object. Photos without a flat border are not cut.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter

from ngt_ray.training.labelled import LabelledImage, read_image_bytes

__all__ = ["PasteOptions", "composites", "cut_out", "paste", "pasted_positives"]

_BORDER = 0.03  # share of each side read as the background
_FLAT = 18.0  # the border's colour spread (grey levels) below which it counts as one flat colour
_DISTANCE = 40.0  # how far (grey levels) from the background a pixel must be to belong to the object


def cut_out(photo: Image.Image) -> Image.Image | None:
    """The object of a product shot as an RGBA image cropped to it, or ``None`` when the photo's
    border is not one flat colour (a scene, not a product shot) or nothing stands out from it."""
    rgb = np.asarray(photo.convert("RGB"), dtype=np.float32)
    h, w, _ = rgb.shape
    b = max(2, round(_BORDER * min(h, w)))
    border = np.concatenate([rgb[:b].reshape(-1, 3), rgb[-b:].reshape(-1, 3),
                             rgb[:, :b].reshape(-1, 3), rgb[:, -b:].reshape(-1, 3)])
    background = np.median(border, axis=0)
    if np.median(np.linalg.norm(border - background, axis=1)) > _FLAT / 2 or border.std(axis=0).max() > _FLAT:
        return None
    mask = np.linalg.norm(rgb - background, axis=2) > _DISTANCE
    if mask.mean() < 0.02 or mask.mean() > 0.9:
        return None
    alpha = Image.fromarray((mask * 255).astype(np.uint8)).filter(ImageFilter.MaxFilter(3)).filter(
        ImageFilter.MinFilter(3)).filter(ImageFilter.GaussianBlur(1))
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    box = (int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1)
    out = photo.convert("RGB").copy()
    out.putalpha(alpha)
    return out.crop(box)


@dataclass(frozen=True)
class PasteOptions:
    """How a cut-out is placed: its longest side as a share of the scene's shorter side, and the
    chances of a mirror, a blur and a light change (each drawn independently)."""

    scale: tuple[float, float] = (0.25, 0.7)
    mirror: float = 0.5
    blur: float = 0.3
    light: float = 0.5


def paste(scene: Image.Image, cut: Image.Image, rng: np.random.Generator,
          options: PasteOptions = PasteOptions()) -> Image.Image:
    """``scene`` with ``cut`` pasted at a random place, size, orientation, sharpness and light."""
    scene = scene.convert("RGB").copy()
    longest = rng.uniform(*options.scale) * min(scene.size)
    factor = longest / max(cut.size)
    size = (max(1, round(cut.width * factor)), max(1, round(cut.height * factor)))
    obj = cut.resize(size, Image.BILINEAR)
    if rng.random() < options.mirror:
        obj = obj.transpose(Image.FLIP_LEFT_RIGHT)
    if rng.random() < options.light:
        rgb = ImageEnhance.Brightness(obj.convert("RGB")).enhance(rng.uniform(0.5, 1.3))
        rgb.putalpha(obj.getchannel("A"))
        obj = rgb
    if rng.random() < options.blur:
        obj = obj.filter(ImageFilter.GaussianBlur(rng.uniform(0.5, 2.0)))
    x = int(rng.integers(0, max(1, scene.width - obj.width + 1)))
    y = int(rng.integers(0, max(1, scene.height - obj.height + 1)))
    scene.paste(obj, (x, y), obj)
    return scene


def composites(cuts: Sequence[Image.Image], scenes: Sequence[Image.Image], n: int, rng: np.random.Generator,
               options: PasteOptions = PasteOptions()) -> list[Image.Image]:
    """``n`` scenes with one cut-out each, both drawn at random (cut-outs cycle so each is used)."""
    order = rng.permutation(n) % len(cuts)
    return [paste(scenes[int(rng.integers(len(scenes)))], cuts[int(i)], rng, options) for i in order]


def pasted_positives(items: Sequence[LabelledImage], n: int, rng: np.random.Generator,
                     max_scenes: int = 400) -> tuple[list[LabelledImage], dict[str, int]]:
    """``n`` new positives, JPEG-encoded, made from ``items`` alone (one split, so composites never
    cross splits): the cut-outs of its product-shot positives pasted into its scene negatives (at
    most ``max_scenes`` of them, drawn at random). Also returns how many of each were used."""
    positives = [src for src, label in items if label == 1]
    negatives = [src for src, label in items if label == 0]
    cuts = [c for src in positives if (c := cut_out(_open(src))) is not None]
    picked = rng.permutation(len(negatives))[:max_scenes]
    scenes = [im for i in picked if cut_out(im := _open(negatives[int(i)])) is None]
    used = {"composites": n if cuts and scenes else 0, "cut_outs": len(cuts), "scenes": len(scenes)}
    if not used["composites"]:
        return [], used
    made = []
    for im in composites(cuts, scenes, n, rng):
        buf = io.BytesIO()
        im.save(buf, "JPEG", quality=90)
        made.append((buf.getvalue(), 1))
    return made, used


def _open(src: Path | str | bytes) -> Image.Image:
    im = Image.open(io.BytesIO(read_image_bytes(src)))
    im.draft("RGB", (1024, 1024))  # cut-outs and scenes need no more
    return im.convert("RGB")
