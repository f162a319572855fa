"""``ngt-ray demo``: a local bucket of real photos with planted positives, moderated end to end.

The bucket is built from Caltech-101's held-out ``test`` split (never trained or calibrated on):
negatives from every class, ``revolver`` photos planted at the chosen prevalence under random
object names, so nothing but the pixels says which is which.
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
from ngt_ray.training.datasets import caltech_split

__all__ = ["PlantedBucket", "build_bucket", "recall_of"]


@dataclass(frozen=True, kw_only=True)
class DemoConfig(Photos):
    """The demo's bucket: held-out photos with planted positives (the job's options come beside)."""

    prevalence: float = option(0.01, "share of planted revolvers")
    max_images: int | None = option(None, "cap on negatives (default: all of the test split)")
    workdir: Path | None = option(None, "folder for the bucket and the results (default: a new temporary folder)")


@dataclass
class PlantedBucket:
    root: Path
    positives: set[str]  # object names of the planted positives
    count: int


def build_bucket(data: Path, dest: Path, *, prevalence: float = 0.01, max_images: int | None = None,
                 split: str = "test", seed: int = 0) -> PlantedBucket:
    """Copy negatives and ``prevalence`` positives from ``split`` into ``dest`` under random names."""
    rng = np.random.default_rng(seed)
    # empty files are placeholders that keep the hash split of a partial copy intact
    items = [(path, label) for path, label in caltech_split(data, split) if path.stat().st_size]
    pos_idx, neg_idx = plant(np.array([label for _, label in items]), prevalence, rng, negatives=max_images)
    chosen_pos, chosen_neg = [items[i][0] for i in pos_idx], [items[i][0] for i in neg_idx]
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    planted = set()
    for path, positive in [(p, True) for p in chosen_pos] + [(p, False) for p in chosen_neg]:
        name = f"{uuid.UUID(int=int(rng.integers(0, 2**63)) << 64 | int(rng.integers(0, 2**63))).hex}.jpg"
        shutil.copyfile(path, dest / name)
        if positive:
            planted.add(name)
    return PlantedBucket(dest, planted, len(chosen_pos) + len(chosen_neg))


def recall_of(flags_dir: Path, positives: set[str]) -> tuple[float, int]:
    """Recall of the planted positives in a flags dataset, and how many flagged rows were planted."""
    table = pq.read_table(flags_dir, columns=["uri", "flagged"]).to_pylist()
    flagged = {row["uri"].rsplit("/", 1)[-1] for row in table if row["flagged"]}
    hits = len(flagged & positives)
    return hits / max(len(positives), 1), hits
