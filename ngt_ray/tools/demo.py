"""``ngt-ray demo``: a local bucket of real photos with planted positives, moderated end to end.

The bucket is built from a held-out ``test`` split (never trained or calibrated on): Caltech-101's
by default (negatives from every class, ``revolver`` photos planted), or that of the labelled
photos named by ``--manifest`` (the firearm set: real firearm photos among everyday scenes) or
``--positives``/``--negatives``, optionally with
copy-paste composites among the positives (``--paste``: small guns in scenes). Positives are planted
at the chosen prevalence under random object names, so nothing but the pixels says which is which.
"""

from __future__ import annotations

import shutil
import uuid
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from ngt_ray.grouptesting.buckets import plant
from ngt_ray.options import Photos, option
from ngt_ray.training.copypaste import pasted_positives
from ngt_ray.training.labelled import labelled_photos, read_image_bytes, without_placeholders

__all__ = ["PlantedBucket", "build_bucket", "recall_of"]


@dataclass(frozen=True, kw_only=True)
class DemoConfig(Photos):
    """The demo's bucket: held-out photos with planted positives (the job's options come beside)."""

    prevalence: float = option(0.01, "share of planted positives")
    max_images: int | None = option(None, "cap on negatives (default: all of the test split)")
    paste: int = option(0, "copy-paste composites added to the positives the bucket is planted from")
    workdir: Path | None = option(None, "folder for the bucket and the results (default: a new temporary folder)")


@dataclass
class PlantedBucket:
    root: Path
    positives: set[str]  # object names of the planted positives
    count: int


def build_bucket(photos: Photos | Path, dest: Path, *, prevalence: float = 0.01, max_images: int | None = None,
                 split: str = "test", seed: int = 0, manifest: str | None = None,
                 paste: int = 0) -> PlantedBucket:
    """Copy negatives and ``prevalence`` positives from ``split`` of ``photos`` (the ``Photos``
    options, or a Caltech-101 folder; ``manifest`` replaces their manifest) into ``dest`` under
    random names; ``paste`` composites join the positives."""
    photos = photos if isinstance(photos, Photos) else Photos(data=photos)
    if manifest:
        photos = replace(photos, manifest=manifest)
    rng = np.random.default_rng(seed)
    items = without_placeholders(labelled_photos(photos).split(split), photos.s3_endpoint)
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
        (dest / name).write_bytes(read_image_bytes(path, photos.s3_endpoint))
        if positive:
            planted.add(name)
    return PlantedBucket(dest, planted, len(chosen_pos) + len(chosen_neg))


def recall_of(flags_dir: Path, positives: set[str]) -> tuple[float, int]:
    """Recall of the planted positives in a flags dataset, and how many flagged rows were planted."""
    table = pq.read_table(flags_dir, columns=["uri", "flagged"]).to_pylist()
    flagged = {row["uri"].rsplit("/", 1)[-1] for row in table if row["flagged"]}
    hits = len(flagged & positives)
    return hits / max(len(positives), 1), hits
