"""Group-testing bookkeeping: forming groups reproducibly and naming them stably.

Kept free of Ray and torch; the algorithms that decide over groups live in ``ngt_ray.algorithms``.
"""

from __future__ import annotations

import hashlib
import zlib
from collections.abc import Iterable, Sequence

import numpy as np

__all__ = ["batch_rng", "form_groups", "group_id", "nearest_size"]



def batch_rng(seed: int, first_key: str) -> np.random.Generator:
    """A generator seeded by the job seed and the batch's first key: the same input gives the same
    groups on every run, whichever actor the batch lands on."""
    return np.random.default_rng([seed, zlib.crc32(first_key.encode())])


def form_groups(n: int, k: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Split ``range(n)`` in a random order into groups of ``k``; the last may be smaller."""
    if k < 1:
        raise ValueError(f"group size must be >= 1, got {k}")
    order = rng.permutation(n)
    return [order[i : i + k] for i in range(0, n, k)]


def group_id(keys: Sequence[str]) -> int:
    """A stable non-negative 63-bit id from the members' keys (unique for distinct member sets)."""
    digest = hashlib.blake2b("\0".join(keys).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1


def nearest_size(sizes: Iterable[int | str], size: int) -> int | str:
    """The entry of ``sizes`` (ints, or their JSON string form) nearest to ``size``; ties go to the
    larger, the more pessimistic for thresholds, pass rates and costs. One rule for every per-size
    table: calibration thresholds, test quality and stage costs."""
    return min(sizes, key=lambda s: (abs(int(s) - size), -int(s)))
