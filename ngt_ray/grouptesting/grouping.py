"""Group-testing bookkeeping: forming groups reproducibly and naming them stably.

Kept free of Ray and torch; the algorithms that decide over groups live in ``ngt_ray.grouptesting.algorithms``.
"""

from __future__ import annotations

import hashlib
import zlib
from collections.abc import Iterable, Sequence

import numpy as np

__all__ = ["batch_rng", "form_groups", "group_ids", "key_hashes", "nearest_size"]


def batch_rng(seed: int, first_key: str) -> np.random.Generator:
    """A generator seeded by the job seed and the batch's first key (relative to the input's root):
    at a fixed k the same objects give the same groups on every run, whichever actor the batch
    lands on and wherever the bucket lives."""
    return np.random.default_rng([seed, zlib.crc32(first_key.encode())])


def form_groups(n: int, k: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Split ``range(n)`` in a random order into groups of ``k``; the last may be smaller."""
    if k < 1:
        raise ValueError(f"group size must be >= 1, got {k}")
    order = rng.permutation(n)
    return [order[i : i + k] for i in range(0, n, k)]


def key_hashes(keys: Sequence[str]) -> np.ndarray:
    """A stable 64-bit hash per key (``uint64``), the same in every process and on every run."""
    return np.fromiter((int.from_bytes(hashlib.blake2b(k.encode(), digest_size=8).digest(), "big") for k in keys),
                       dtype=np.uint64, count=len(keys))


def group_ids(hashes: np.ndarray, members: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """One stable non-negative 63-bit id per group, from its members' key hashes.

    ``members`` holds the groups' member indices back to back, ``sizes`` how many each group has.
    The id combines the members' hashes by XOR, so it names the member *set* (the same group gets
    the same id whatever the order), distinct sets collide with probability ~2^-63, and the whole
    batch is one vectorised reduction with no per-group Python.
    """
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)
    return (np.bitwise_xor.reduceat(hashes[members], starts) >> np.uint64(1)).astype(np.int64)


def nearest_size(sizes: Iterable[int | str], size: int) -> int | str:
    """The entry of ``sizes`` (ints, or their JSON string form) nearest to ``size``; ties go to the
    larger, the more pessimistic for thresholds, pass rates and costs. One rule for every per-size
    table: calibration thresholds, test quality and stage costs."""
    return min(sizes, key=lambda s: (abs(int(s) - size), -int(s)))
