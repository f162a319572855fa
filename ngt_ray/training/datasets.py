"""Caltech-101's splits as local paths, for scripts and tests that handle the files themselves.

The split is ``LabelledSet.from_caltech``'s (``ngt_ray.training.labelled``): per class folder, by a
hash of each file name, 60 / 20 / 20; ``revolver`` is the positive class.
"""

from __future__ import annotations

from pathlib import Path

from ngt_ray.training.labelled import LabelledSet

__all__ = ["caltech_split"]


def caltech_split(root: str | Path, split: str) -> list[tuple[Path, int]]:
    """``(path, label)`` pairs of one split; label 1 for ``revolver``, 0 for every other class."""
    return [(Path(uri), label) for uri, label in LabelledSet.from_caltech(root).split(split)]
