"""Source families: photos that must share a split, so a test split measures skill, not memory.

A split by file hash lets frames of one video, crops of one stock photo and re-encodes of one
picture sit on both sides of the train/test line; the test split then looks like the training data
and scores what the model remembers (the first firearm model, split by file, was near perfect on
its own test split and far worse on photos from elsewhere). Two rules put such photos in one family:

* **names**: exporters and scrapers number what they take from one place (``armas--1295-``,
  ``KravMagaTraining467``, ``core50_images_C_01_16_131``): the name without its digits, and the
  number's block of ``block`` consecutive values, is a family;
* **looks**: a 64-bit difference hash of the greyscale thumbnail; photos within ``max_distance``
  bits of each other are near-duplicates (a re-encode, a resize, the next frame) and their
  families are joined (union-find), whatever their names say.

A family is then assigned to train, val or test by a hash of its name, so adding photos elsewhere
never moves a split.
"""

from __future__ import annotations

import hashlib
import io
import re
from collections import Counter
from collections.abc import Sequence
from pathlib import PurePosixPath

import numpy as np
from PIL import Image

__all__ = ["difference_hash", "family_splits", "name_family", "near_duplicate_families"]

_ROBOFLOW = re.compile(r"_(jpe?g|png)\.rf\.[0-9a-f]{32}$", re.IGNORECASE)
_NUMBER = re.compile(r"\d+")
_RANDOM_ID = re.compile(r"^[A-Z0-9]{8,}$")  # an exporter's random name says nothing about where a photo came from
_FRACTIONS = (("train", 0.6), ("val", 0.8), ("test", 1.0))


def name_family(uri: str, block: int = 100) -> str:
    """The family a file name implies: its letters and separators, and the block of its last number
    (``armas--1295-_jpg.rf.<hash>.jpg`` -> ``armas---#12``). A name without a number is its own."""
    stem = _ROBOFLOW.sub("", PurePosixPath(uri.split("#")[0]).stem)
    numbers = _NUMBER.findall(stem)
    if not numbers or _RANDOM_ID.match(stem) or len(stem) - sum(map(len, numbers)) < 2:  # ids, bare numbers
        return stem
    return f"{_NUMBER.sub('#', stem)}{int(numbers[-1]) // block}"


def difference_hash(data: bytes, size: int = 8) -> int:
    """A 64-bit dHash: is each pixel of a (size+1) x size greyscale thumbnail brighter than its right neighbour."""
    with Image.open(io.BytesIO(data)) as img:
        img.draft("L", (64, 64))
        grey = np.asarray(img.convert("L").resize((size + 1, size), Image.Resampling.BILINEAR), dtype=np.int16)
    bits = (grey[:, 1:] > grey[:, :-1]).ravel()
    return int(np.packbits(bits).view(">u8")[0])


def near_duplicate_families(families: Sequence[str], hashes: Sequence[int], sources: Sequence[str],
                            max_distance: int = 2) -> list[str]:
    """``families`` with every pair of near-duplicate photos of one source (hashes within
    ``max_distance`` bits) joined into one family, named by its smallest member family.

    Flat images (a product on a plain background, a faded film frame) have hashes of almost all
    zeros or ones that say nothing about the picture; they join nothing, or chaining would merge
    hundreds of unrelated photos into one family."""
    parent = {f: f for f in families}

    def root(f: str) -> str:
        while parent[f] != f:
            parent[f] = parent[parent[f]]
            f = parent[f]
        return f

    h = np.asarray(hashes, dtype=np.uint64)
    bits = np.unpackbits(h.view(np.uint8).reshape(-1, 8), axis=1).sum(axis=1)
    informative = (bits >= 12) & (bits <= 52)
    src = np.asarray(sources)
    for i in np.flatnonzero(informative):
        # popcount of the xor with every later photo: O(n^2 / 2) 64-bit words, a second for 10,000 photos
        x = h[i + 1:] ^ h[i]
        distance = np.unpackbits(x.view(np.uint8).reshape(-1, 8), axis=1).sum(axis=1)
        close = (distance <= max_distance) & informative[i + 1:] & (src[i + 1:] == src[i])
        for j in np.flatnonzero(close) + i + 1:
            a, b = root(families[i]), root(families[j])
            if a != b:
                parent[max(a, b)] = min(a, b)
    return [root(f) for f in families]


def family_splits(families: Sequence[str], sources: Sequence[str], largest: float = 0.05) -> list[str]:
    """train / val / test: 60 / 20 / 20 of families by a hash of each family's name; a family
    holding over ``largest`` of its source's photos trains, since as a test split it would be one
    scene seen many times (and would tilt the split sizes)."""
    total = Counter(sources)
    size = Counter(zip(families, sources))
    out = []
    for family, source in zip(families, sources):
        if size[family, source] > largest * total[source]:
            out.append("train")
            continue
        u = int(hashlib.sha1(family.encode()).hexdigest()[:8], 16) / 16**8
        out.append(next(name for name, hi in _FRACTIONS if u < hi))
    return out
