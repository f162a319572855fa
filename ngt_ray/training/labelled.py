"""A user's labelled images, from folders, buckets or a manifest, split once and for all.

``ngt-ray train`` learns any class: ``--positives URL --negatives URL`` (folders or any fsspec URL,
several of each) or ``--manifest`` (CSV or Parquet with ``uri,label`` columns). Each image is
assigned to train / val / test (60 / 20 / 20) by a hash of its file name within its label, as the
Caltech split is, so a split never changes when images are added elsewhere and needs no stored
list. A manifest may instead name each image's split in a ``split`` column (a split the user
already keeps, or one shared with another set: the firearm manifest keeps Caltech-101's photos in
their Caltech split, so the Caltech demo's test photos stay unseen). The sources are kept per
image, so a report can say where every split's images come from.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import PurePath, PurePosixPath

import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from ngt_ray.storage import resolve

__all__ = ["IMAGE_SUFFIXES", "LabelledSet", "read_image_bytes"]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif")
_FRACTIONS = {"train": (0.0, 0.6), "val": (0.6, 0.8), "test": (0.8, 1.0)}


def read_image_bytes(src: str | PurePath | bytes, s3_endpoint: str | None = None) -> bytes:
    """The bytes of one labelled image: any fsspec URL or local path, or the encoded image itself
    (composites made in memory travel as their bytes)."""
    if isinstance(src, bytes):
        return src
    loc = resolve(str(src), s3_endpoint)
    return loc.fs.cat_file(loc.path)


@dataclass(frozen=True)
class LabelledSet:
    """Labelled image URLs with their source; ``split(name)`` gives ``(uri, label)`` pairs."""

    uris: tuple[str, ...]
    labels: tuple[int, ...]
    sources: tuple[str, ...]
    assigned: tuple[str, ...] | None = None  # per image: its split from the manifest, or "" for the hash

    @classmethod
    def from_folders(cls, positives: Iterable[str], negatives: Iterable[str],
                     s3_endpoint: str | None = None) -> LabelledSet:
        """Every image (by suffix) under each URL, 1 for ``positives`` and 0 for ``negatives``."""
        uris, labels, sources = [], [], []
        for label, urls in ((1, positives), (0, negatives)):
            for url in urls:
                loc = resolve(url, s3_endpoint)
                found = [p for p in sorted(loc.fs.find(loc.path)) if p.lower().endswith(IMAGE_SUFFIXES)]
                if not found:
                    raise FileNotFoundError(f"no images ({', '.join(IMAGE_SUFFIXES)}) under {url}")
                uris += [loc.uri(p) for p in found]
                labels += [label] * len(found)
                sources += [url] * len(found)
        return cls(tuple(uris), tuple(labels), tuple(sources))._checked()

    @classmethod
    def from_manifest(cls, url: str, s3_endpoint: str | None = None) -> LabelledSet:
        """A CSV or Parquet table with ``uri`` and ``label`` (0/1) columns, and optionally ``source``."""
        loc = resolve(url, s3_endpoint)
        with loc.fs.open(loc.path, "rb") as f:
            table = pq.read_table(f) if loc.path.endswith(".parquet") else pacsv.read_csv(f)
        missing = {"uri", "label"} - set(table.column_names)
        if missing:
            raise ValueError(f"manifest {url} lacks the column(s) {sorted(missing)}; it has {table.column_names}")
        uris = [str(u) for u in table.column("uri").to_pylist()]
        labels = [int(v) for v in table.column("label").to_pylist()]
        if set(labels) - {0, 1}:
            raise ValueError(f"manifest {url}: labels must be 0 or 1, got {sorted(set(labels))}")
        sources = (table.column("source").to_pylist() if "source" in table.column_names else [url] * len(uris))
        assigned = None
        if "split" in table.column_names:
            assigned = tuple("" if v is None else str(v) for v in table.column("split").to_pylist())
            if set(assigned) - {"", *_FRACTIONS}:
                raise ValueError(f"manifest {url}: split must be one of {sorted(_FRACTIONS)} or empty, "
                                 f"got {sorted(set(assigned) - {'', *_FRACTIONS})}")
        return cls(tuple(uris), tuple(labels), tuple(map(str, sources)), assigned)._checked()

    def _checked(self) -> LabelledSet:
        counts = Counter(self.labels)
        if not counts[1] or not counts[0]:
            raise ValueError(f"a labelled set needs positives and negatives; got {counts[1]} and {counts[0]}")
        return self

    def split(self, name: str) -> list[tuple[str, int]]:
        """``(uri, label)`` of one split, in a fixed order."""
        return [(self.uris[i], self.labels[i]) for i in self._indices(name)]

    def _indices(self, name: str) -> list[int]:
        if name not in _FRACTIONS:
            raise ValueError(f"split must be one of {sorted(_FRACTIONS)}, got {name!r}")
        lo, hi = _FRACTIONS[name]
        out: list[int] = []
        for label in (1, 0):
            members = sorted((i for i, y in enumerate(self.labels) if y == label and not self._named(i)),
                             key=self._order)
            a, b = round(lo * len(members)), round(hi * len(members))
            out += members[a:b] + [i for i, y in enumerate(self.labels) if y == label and self._named(i) == name]
        return out

    def _named(self, i: int) -> str:
        return self.assigned[i] if self.assigned else ""

    def _order(self, i: int) -> str:
        return hashlib.sha1(PurePosixPath(self.uris[i].split("#")[0]).name.encode()).hexdigest()

    def report(self, names: Sequence[str] = ("train", "val", "test")) -> dict[str, dict]:
        """Per split: positives, negatives, and how many of each label every source gave."""
        out = {}
        for name in names:
            idx = self._indices(name)
            by_source = Counter((self.sources[i], self.labels[i]) for i in idx)
            out[name] = {"positives": sum(self.labels[i] for i in idx),
                         "negatives": sum(1 - self.labels[i] for i in idx),
                         "sources": {f"{src} ({'positive' if y else 'negative'})": n
                                     for (src, y), n in sorted(by_source.items())}}
        return out

