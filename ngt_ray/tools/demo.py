"""``ngt-ray demo``: a local bucket of real photos with planted positives, moderated end to end.

The bucket is built from a held-out ``test`` split (never trained or calibrated on): Caltech-101's
by default (negatives from every class, ``revolver`` photos planted), or a labelled manifest's with
``--manifest`` (the firearm set: real firearm photos among everyday scenes), optionally with
copy-paste composites among the positives (``--paste``: small guns in scenes). Positives are planted
at the chosen prevalence under random object names, so nothing but the pixels says which is which.
"""

from __future__ import annotations

import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from ngt_ray.grouptesting.buckets import plant
from ngt_ray.options import Photos, option
from ngt_ray.storage import resolve
from ngt_ray.training.copypaste import pasted_positives
from ngt_ray.training.datasets import LabelledImage, caltech_split
from ngt_ray.training.labelled import LabelledSet, read_image_bytes

__all__ = ["PlantedBucket", "build_bucket", "recall_of"]


@dataclass(frozen=True, kw_only=True)
class DemoConfig(Photos):
    """The demo's bucket: held-out photos with planted positives (the job's options come beside)."""

    prevalence: float = option(0.01, "share of planted positives")
    max_images: int | None = option(None, "cap on negatives (default: all of the test split)")
    manifest: str | None = option(None, "a labelled manifest (uri,label[,source,split]) whose test split makes "
                                        "the bucket (default: Caltech-101 under --data)")
    paste: int = option(0, "copy-paste composites added to the positives the bucket is planted from")
    workdir: Path | None = option(None, "folder for the bucket and the results (default: a new temporary folder)")


@dataclass
class PlantedBucket:
    root: Path
    positives: set[str]  # object names of the planted positives
    count: int


def build_bucket(data: Path, dest: Path, *, prevalence: float = 0.01, max_images: int | None = None,
                 split: str = "test", seed: int = 0, manifest: str | None = None,
                 paste: int = 0) -> PlantedBucket:
    """Copy negatives and ``prevalence`` positives from ``split`` (of Caltech-101 under ``data``, or
    of ``manifest``) into ``dest`` under random names; ``paste`` composites join the positives."""
    rng = np.random.default_rng(seed)
    items: list[LabelledImage] = (LabelledSet.from_manifest(manifest).split(split) if manifest
                                  else caltech_split(data, split))
    # empty files are placeholders that keep the hash split of a partial copy intact
    items = [(path, label) for path, label in items if _size(path)]
    if paste:
        items += pasted_positives(items, paste, rng)[0]
    pos_idx, neg_idx = plant(np.array([label for _, label in items]), prevalence, rng, negatives=max_images)
    chosen_pos, chosen_neg = [items[i][0] for i in pos_idx], [items[i][0] for i in neg_idx]
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    planted = set()
    for path, positive in [(p, True) for p in chosen_pos] + [(p, False) for p in chosen_neg]:
        name = f"{uuid.UUID(int=int(rng.integers(0, 2**63)) << 64 | int(rng.integers(0, 2**63))).hex}.jpg"
        (dest / name).write_bytes(read_image_bytes(path))
        if positive:
            planted.add(name)
    return PlantedBucket(dest, planted, len(chosen_pos) + len(chosen_neg))


def _size(path: Path | str | bytes) -> int:
    if isinstance(path, bytes):
        return len(path)
    loc = resolve(str(path))
    return int(loc.fs.size(loc.path))


def recall_of(flags_dir: Path, positives: set[str]) -> tuple[float, int]:
    """Recall of the planted positives in a flags dataset, and how many flagged rows were planted."""
    table = pq.read_table(flags_dir, columns=["uri", "flagged"]).to_pylist()
    flagged = {row["uri"].rsplit("/", 1)[-1] for row in table if row["flagged"]}
    hits = len(flagged & positives)
    return hits / max(len(positives), 1), hits
