"""Object-storage inputs as a Ray Dataset of ``(uri, bytes)`` rows, whatever their packaging.

Three forms are read: plain image objects, WebDataset ``.tar`` shards (one row per sample), and
Parquet files with an image-bytes column (one row per table row). Rows carry encoded bytes, never
decoded pixels, so the object store holds compact data until the decode stage.
"""

from __future__ import annotations

import io
import tarfile
from collections import OrderedDict
from pathlib import PurePosixPath

import numpy as np
import pyarrow.parquet as pq
import ray.data

from ngt_ray.job.fetch import fetch
from ngt_ray.storage import Location

__all__ = ["FORMATS", "IMAGE_SUFFIXES", "detect_format", "list_objects", "pick_column", "read_source"]

FORMATS = ("images", "webdataset", "parquet")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp")
_KEY_COLUMNS = ("uri", "url", "key", "path", "id", "name", "__key__")
_IMAGE_COLUMNS = ("image", "bytes", "jpg", "jpeg", "png", "img", "content")


def _first_object(loc: Location, suffix: str = "") -> str:
    """The first visible object under ``loc`` (``loc`` itself if it is a file), ending in ``suffix``.

    ``fs.walk`` is lazy, so this stays cheap on a bucket of a billion objects; listing errors such
    as bad credentials are raised, not mistaken for an empty prefix.
    """
    if loc.fs.isfile(loc.path):
        return loc.path
    for root, _dirs, files in loc.fs.walk(loc.path, on_error="raise"):
        for f in sorted(files):
            if f.endswith(suffix) and not f.startswith((".", "_")):
                return f"{root}/{f}"
    raise FileNotFoundError(f"no {suffix or 'objects'}{' files' if suffix else ''} under {loc.url}")


def detect_format(loc: Location) -> str:
    """Guess the input form from the first object under ``loc`` (or ``loc`` itself)."""
    suffix = PurePosixPath(_first_object(loc)).suffix.lower()
    if suffix == ".tar":
        return "webdataset"
    if suffix == ".parquet":
        return "parquet"
    return "images"


_OBJECTS_PER_READ = 256  # objects one read call fetches (concurrently, on object stores)


def list_objects(loc: Location) -> list[str]:
    """Every object under ``loc`` (or ``loc`` itself if it is one), sorted; listing errors such as
    bad credentials are raised, not mistaken for an empty prefix."""
    if loc.fs.isfile(loc.path):
        return [loc.path]
    paths = sorted(loc.fs.find(loc.path))
    if not paths and not loc.fs.exists(loc.path):
        raise FileNotFoundError(f"no objects under {loc.url}")
    return paths


def _read_objects(batch: dict[str, np.ndarray], loc: Location) -> dict[str, np.ndarray]:
    """``(uri, bytes, error, read_attempts)`` rows for a batch of object paths.

    ``ngt_ray.job.fetch`` reads them concurrently, retries transient failures with backoff, and
    classifies the rest: an object that cannot be read (vanished since the listing, forbidden,
    failing after every attempt) becomes a row with no bytes and the reason, never a failed block;
    a bucket or store that cannot be read stops the run (``StorageError``). A ``size`` column, where
    the listing gives one, lets a short read count as a truncated body. ``read_attempts`` is for
    logs and stats; the flags ignore it.
    """
    paths = [str(p) for p in batch["path"]]
    sizes = [int(s) if s is not None and s >= 0 else None for s in batch["size"]] if "size" in batch else None
    got = fetch(loc.fs, paths, sizes=sizes)
    blobs = [value if isinstance(value, bytes) else b"" for value in got.results]
    errors = ["" if isinstance(value, bytes) else str(value) for value in got.results]
    return {"uri": np.array([loc.uri(p) for p in paths], dtype=object),
            "bytes": np.array(blobs, dtype=object), "error": np.array(errors, dtype=object),
            "read_attempts": np.array(got.attempts, dtype=np.int16)}


def _expand_tar_shards(batch: dict[str, np.ndarray], loc: Location) -> dict[str, np.ndarray]:
    """One row per WebDataset sample: members sharing a key form a sample, its image is the row.

    Ray's ``read_webdataset`` fails a whole block on a corrupt shard; here a shard that cannot be
    read becomes one row with no bytes (an error row downstream), and a sample without an image
    member becomes a row with no bytes too.
    """
    uris: list[str] = []
    blobs: list[bytes] = []
    for path, data in zip(batch["path"], batch["bytes"]):
        shard = loc.uri(path)
        try:
            samples: OrderedDict[str, bytes | None] = OrderedDict()
            with tarfile.open(fileobj=io.BytesIO(data), mode="r:*") as tar:
                for member in tar:
                    if not member.isfile():
                        continue
                    name = PurePosixPath(member.name)
                    key = str(name.parent / name.name.split(".", 1)[0])
                    samples.setdefault(key, None)
                    if name.suffix.lower() in IMAGE_SUFFIXES and samples[key] is None:
                        samples[key] = tar.extractfile(member).read()
            if not samples:
                raise tarfile.TarError("shard holds no samples")
        except (tarfile.TarError, OSError, EOFError) as exc:
            uris.append(f"{shard}#<unreadable shard: {type(exc).__name__}>")
            blobs.append(b"")
            continue
        for key, blob in samples.items():
            uris.append(f"{shard}#{key}")
            blobs.append(blob or b"")
    return {"uri": np.array(uris, dtype=object), "bytes": np.array(blobs, dtype=object)}


def pick_column(names: list[str], wanted: str | None, preferred: tuple[str, ...], what: str, where: str) -> str:
    """``wanted`` if ``where`` has it, else the first of ``preferred`` it has; errors say which option names it."""
    if wanted:
        if wanted not in names:
            raise ValueError(f"{what} column {wanted!r} is not in {where} (columns: {names})")
        return wanted
    for name in preferred:
        if name in names:
            return name
    raise ValueError(f"cannot tell the {what} column of {where} (columns: {names}); name it with --{what}-column")


def _unfinished(batch: dict[str, np.ndarray], skip: frozenset[str]) -> dict[str, np.ndarray]:
    """The rows of ``batch`` whose uri an earlier attempt of the run has not written yet."""
    keep = np.array([u not in skip for u in batch["uri"]], dtype=bool)
    return {name: column[keep] for name, column in batch.items()}


def read_source(
    loc: Location,
    fmt: str = "auto",
    *,
    image_column: str | None = None,
    key_column: str | None = None,
    paths: ray.data.Dataset | None = None,
    skip: frozenset[str] = frozenset(),
    task_cpus: float = 1.0,
    block_rows: int = _OBJECTS_PER_READ,
) -> ray.data.Dataset:
    """A lazy Dataset of ``{"uri": str, "bytes": bytes}`` rows for the objects under ``loc``.

    ``paths``: a Dataset of ``{"path": ...}`` rows (from a manifest) read instead of listing ``loc``.
    ``skip``: uris already written by an earlier attempt of the run (never read again where the
    uri is an object's, filtered before decode where it is a shard's or a table's sample).
    ``task_cpus``: CPUs of each read task (see ``ngt_ray.job.placement``).
    ``block_rows``: listed objects per block at most. A block is what flows to the model actors and
    the writer as one piece, so it is also the smallest piece of work an interrupted run keeps.
    """
    tasks = {"num_cpus": task_cpus}
    if paths is not None:
        fmt = "images"
    elif fmt == "auto":
        fmt = detect_format(loc)
    per_read = min(block_rows, _OBJECTS_PER_READ)
    if fmt == "images":
        if paths is None:
            # Listed once on the driver (as Ray's file readers do), then read in batches: Ray's
            # read_binary_files builds a one-row table per object, ~200 us of CPU each.
            listed = [p for p in list_objects(loc) if loc.uri(p) not in skip]
            paths = ray.data.from_items([{"path": p} for p in listed],
                                        override_num_blocks=max(1, -(-len(listed) // per_read)))
        elif skip:
            paths = paths.filter(lambda row: loc.uri(row["path"]) not in skip)
        return paths.map_batches(_read_objects, fn_kwargs={"loc": loc}, batch_size=per_read,
                                 batch_format="numpy", **tasks)
    if fmt == "webdataset":
        ds = ray.data.read_binary_files(
            loc.path, include_paths=True, filesystem=loc.arrow_fs, file_extensions=["tar"], num_cpus=task_cpus
        )
        ds = ds.map_batches(_expand_tar_shards, fn_kwargs={"loc": loc}, batch_size=1, batch_format="numpy", **tasks)
    elif fmt == "parquet":
        first = _first_object(loc, ".parquet")
        schema = pq.read_schema(first, filesystem=loc.arrow_fs)
        image = pick_column(schema.names, image_column, _IMAGE_COLUMNS, "image", loc.uri(first))
        key = pick_column(schema.names, key_column, _KEY_COLUMNS, "key", loc.uri(first))
        ds = ray.data.read_parquet(loc.path, filesystem=loc.arrow_fs, include_paths=True,
                                   num_cpus=task_cpus).select_columns([key, image, "path"])

        def to_rows(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            uris = [f"{loc.uri(p)}#{k}" for p, k in zip(batch["path"], batch[key])]
            return {"uri": np.array(uris, dtype=object), "bytes": batch[image]}

        ds = ds.map_batches(to_rows, batch_format="numpy", **tasks)
    else:
        raise ValueError(f"input format must be one of {('auto', *FORMATS)}, got {fmt!r}")
    if skip:
        ds = ds.map_batches(_unfinished, fn_kwargs={"skip": skip}, batch_format="numpy", **tasks)
    return ds
