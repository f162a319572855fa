"""Labelled photos from a manifest, folders, buckets or Caltech-101, split once and for all.

Every command that reads labelled photos (train, calibrate, compress, evaluate, benchmark, demo)
gets them from ``labelled_photos``: ``--manifest`` (CSV or Parquet with ``uri,label`` columns, and
optionally ``source`` and ``split``), ``--positives URL ... --negatives URL ...`` (folders or any
fsspec URL), or else the Caltech-101 folder (``--data``; ``revolver`` is the positive class).

Each image is assigned to train / val / test (60 / 20 / 20) by one rule, ``hash_split``: a hash of
its file name, taken within its stratum (its label; for Caltech, its class folder). A split never
changes when images are added to another stratum and needs no stored list, so the demo's test
photos are never trained or calibrated on. A manifest may instead name an image's split in its
``split`` column (a split the user already keeps, or one shared with another set: the firearm
manifest keeps Caltech-101's photos in their Caltech split). The sources are kept per image, so a
report can say where every split's images come from.
"""

from __future__ import annotations

import hashlib
import os
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePath, PurePosixPath
from typing import Any

import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from ngt_ray.options import Photos
from ngt_ray.storage import resolve

__all__ = ["CALTECH_POSITIVE_CLASS", "IMAGE_SUFFIXES", "SPLITS", "LabelledImage", "LabelledSet", "hash_split",
           "labelled_photos", "read_image_bytes", "without_placeholders"]

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif")
SPLITS = ("train", "val", "test")
_FRACTIONS = {"train": (0.0, 0.6), "val": (0.6, 0.8), "test": (0.8, 1.0)}
CALTECH_POSITIVE_CLASS = "revolver"

LabelledImage = tuple[Path | str | bytes, int]  # a local path, any fsspec URL, or an encoded image (made here)


def hash_split(names: Sequence[str], split: str) -> list[int]:
    """Positions in ``names`` (file names of one stratum) of those in ``split``: the names sorted by
    their sha1 (equal names keep their order), cut at 60 % and 80 %."""
    if split not in _FRACTIONS:
        raise ValueError(f"split must be one of {list(SPLITS)}, got {split!r}")
    order = sorted(range(len(names)), key=lambda i: hashlib.sha1(names[i].encode()).hexdigest())
    lo, hi = _FRACTIONS[split]
    return order[round(lo * len(names)):round(hi * len(names))]


def read_image_bytes(src: str | PurePath | bytes, s3_endpoint: str | None = None) -> bytes:
    """The bytes of one labelled image: any fsspec URL or local path, or the encoded image itself
    (composites made in memory travel as their bytes)."""
    if isinstance(src, bytes):
        return src
    loc = resolve(str(src), s3_endpoint)
    return loc.fs.cat_file(loc.path)


def without_placeholders(items: Iterable[LabelledImage], s3_endpoint: str | None = None) -> list[LabelledImage]:
    """``items`` less empty files: placeholders that keep the hash split of a partial copy intact
    (``jobs/gpu_data.py``)."""
    def size(src: Path | str | bytes) -> int:
        if isinstance(src, bytes):
            return len(src)
        loc = resolve(str(src), s3_endpoint)
        return int(loc.fs.size(loc.path))

    return [(src, label) for src, label in items if size(src)]


@dataclass(frozen=True)
class LabelledSet:
    """Labelled image URLs with their source; ``split(name)`` gives ``(uri, label)`` pairs."""

    uris: tuple[str, ...]
    labels: tuple[int, ...]
    sources: tuple[str, ...]
    assigned: tuple[str, ...] | None = None  # per image: its split from the manifest, or "" for the hash
    strata: tuple[str, ...] | None = None  # per image: what its hash split is taken within (default: its label)
    origin: dict[str, Any] = field(default_factory=dict, compare=False)  # where the set comes from, for cards

    @classmethod
    def from_folders(cls, positives: Iterable[str], negatives: Iterable[str],
                     s3_endpoint: str | None = None) -> LabelledSet:
        """Every image (by suffix) under each URL, 1 for ``positives`` and 0 for ``negatives``."""
        positives, negatives = list(positives), list(negatives)
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
        return cls(tuple(uris), tuple(labels), tuple(sources),
                   origin={"positives": positives, "negatives": negatives})._checked()

    @classmethod
    def from_manifest(cls, url: str, s3_endpoint: str | None = None) -> LabelledSet:
        """A CSV or Parquet table with ``uri`` and ``label`` (0/1) columns, and optionally ``source``
        and ``split`` (a named split, or empty for the hash split)."""
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
            if set(assigned) - {"", *SPLITS}:
                raise ValueError(f"manifest {url}: split must be one of {list(SPLITS)} or empty, "
                                 f"got {sorted(set(assigned) - {'', *SPLITS})}")
        return cls(tuple(uris), tuple(labels), tuple(map(str, sources)), assigned,
                   origin={"manifest": url})._checked()

    @classmethod
    def from_caltech(cls, root: str | Path) -> LabelledSet:
        """Caltech-101's training folder: label 1 for ``revolver``, 0 for every other class; each
        class folder is split on its own."""
        train_dir = Path(root) / "train"
        if not train_dir.is_dir():
            raise FileNotFoundError(f"no Caltech-101 training folder at {train_dir}")
        if "#" in str(train_dir):  # a uri's "#" starts a key inside a container: the hash would read no file name
            raise ValueError(f"a Caltech-101 folder's path may not hold '#': {train_dir}")
        uris, labels, sources, strata = [], [], [], []
        for class_dir in sorted(p for p in train_dir.iterdir() if p.is_dir()):
            label = int(class_dir.name == CALTECH_POSITIVE_CLASS)
            files = sorted(class_dir.glob("*.jpg"))
            uris += [str(f) for f in files]
            labels += [label] * len(files)
            sources += [f"caltech101/{CALTECH_POSITIVE_CLASS}" if label else "caltech101/other"] * len(files)
            strata += [class_dir.name] * len(files)
        return cls(tuple(uris), tuple(labels), tuple(sources), strata=tuple(strata),
                   origin={"caltech101": str(root), "positive_class_folder": CALTECH_POSITIVE_CLASS})._checked()

    def _checked(self) -> LabelledSet:
        counts = Counter(self.labels)
        if not counts[1] or not counts[0]:
            raise ValueError(f"a labelled set needs positives and negatives; got {counts[1]} and {counts[0]}")
        return self

    @property
    def name(self) -> str:
        """A short name for reports: the manifest, the folders, or ``caltech101``."""
        if "manifest" in self.origin:
            return str(self.origin["manifest"])
        if "positives" in self.origin:
            return f"positives {', '.join(self.origin['positives'])}; negatives {', '.join(self.origin['negatives'])}"
        return "caltech101"

    def split(self, name: str) -> list[tuple[str, int]]:
        """``(uri, label)`` of one split, in a fixed order."""
        return [(self.uris[i], self.labels[i]) for i in self._indices(name)]

    def _indices(self, name: str) -> list[int]:
        if name not in _FRACTIONS:
            raise ValueError(f"split must be one of {list(SPLITS)}, got {name!r}")
        out: list[int] = []
        for members in self._strata():
            hashed = [i for i in members if not self._named(i)]
            out += [hashed[j] for j in hash_split([self._file_name(i) for i in hashed], name)]
            out += [i for i in members if self._named(i) == name]
        return out

    def _strata(self) -> list[list[int]]:
        """Indices of the images split together, in the order a split lists them: the positives,
        then the negatives; or each stratum, in the order the set first meets it."""
        if self.strata is None:
            return [[i for i, y in enumerate(self.labels) if y == label] for label in (1, 0)]
        groups: dict[str, list[int]] = {}
        for i, stratum in enumerate(self.strata):
            groups.setdefault(stratum, []).append(i)
        return list(groups.values())

    def _named(self, i: int) -> str:
        return self.assigned[i] if self.assigned else ""

    def _file_name(self, i: int) -> str:
        return PurePosixPath(self.uris[i].split("#")[0]).name

    def report(self, names: Sequence[str] = SPLITS) -> dict[str, dict]:
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


def labelled_photos(photos: Photos) -> LabelledSet:
    """The labelled photos a command's ``Photos`` options name: ``--manifest``, else
    ``--positives``/``--negatives``, else Caltech-101 under ``--data`` (or the shared default).

    ``--s3-endpoint`` becomes this process's S3 endpoint (``AWS_ENDPOINT_URL_S3``, as botocore reads
    it): the photos' bytes are read again wherever training needs them (embedding, degraded copies,
    copy-paste), each by its uri alone, and every such read must reach the same store."""
    if photos.s3_endpoint:
        os.environ["AWS_ENDPOINT_URL_S3"] = photos.s3_endpoint
    if photos.manifest and (photos.positives or photos.negatives):
        raise ValueError("give --manifest or --positives/--negatives, not both")
    if photos.manifest:
        return LabelledSet.from_manifest(photos.manifest, photos.s3_endpoint)
    if photos.positives or photos.negatives:
        return LabelledSet.from_folders(photos.positives, photos.negatives, photos.s3_endpoint)
    return LabelledSet.from_caltech(photos.caltech)
