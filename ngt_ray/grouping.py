"""Group-testing bookkeeping: forming groups and the two-round (Dorfman) decision rule.

Kept free of Ray and torch so the rule can be checked against a plain reference and reused by the
screen and retest stages alike.
"""

from __future__ import annotations

import hashlib
import zlib
from collections.abc import Sequence

import numpy as np

__all__ = ["batch_rng", "dorfman_decide", "form_groups", "group_id"]



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


def dorfman_decide(
    group_scores: np.ndarray,
    group_threshold: float,
    individual_scores: np.ndarray,
    individual_threshold: float,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per image: ``(flagged, retested, score)`` under two-round Dorfman testing.

    A group whose score is below its threshold clears every member (score = the group score);
    members of a positive group are decided by their individual score. ``individual_scores`` is
    only read where the group was positive (NaN elsewhere is fine).
    """
    group_scores = np.asarray(group_scores, dtype=np.float32)
    individual_scores = np.asarray(individual_scores, dtype=np.float32)
    retested = group_scores >= group_threshold
    score = np.where(retested, individual_scores, group_scores).astype(np.float32)
    flagged = retested & (individual_scores >= individual_threshold)
    return flagged, retested, score
