"""The labelled photo sets ngt-ray trains and demonstrates on, split once and for all.

Caltech-101's training split has the rare class ``revolver`` (55 of 6,096 images). It is divided
per class into train / val / test (60 / 20 / 20) by a hash of each file name, so the split is the
same on every machine, needs no stored list, and the demo's ``test`` images are never trained or
calibrated on.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

__all__ = ["POSITIVE_CLASS", "LabelledImage", "caltech_split"]

POSITIVE_CLASS = "revolver"
_FRACTIONS = {"train": (0.0, 0.6), "val": (0.6, 0.8), "test": (0.8, 1.0)}

LabelledImage = tuple[Path | str | bytes, int]  # a local path, any fsspec URL, or an encoded image (made here)


def _order(path: Path) -> str:
    return hashlib.sha1(path.name.encode()).hexdigest()


def caltech_split(root: str | Path, split: str) -> list[LabelledImage]:
    """``(path, label)`` pairs of one split; label 1 for ``revolver``, 0 for every other class."""
    if split not in _FRACTIONS:
        raise ValueError(f"split must be one of {sorted(_FRACTIONS)}, got {split!r}")
    train_dir = Path(root) / "train"
    if not train_dir.is_dir():
        raise FileNotFoundError(f"no Caltech-101 training folder at {train_dir}")
    lo, hi = _FRACTIONS[split]
    out: list[LabelledImage] = []
    for class_dir in sorted(p for p in train_dir.iterdir() if p.is_dir()):
        files = sorted(class_dir.glob("*.jpg"), key=_order)
        a, b = round(lo * len(files)), round(hi * len(files))
        label = int(class_dir.name == POSITIVE_CLASS)
        out.extend((f, label) for f in files[a:b])
    return out
