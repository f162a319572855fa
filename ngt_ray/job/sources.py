"""Object-storage inputs as a Ray Dataset of ``(uri, bytes)`` rows, whatever their packaging.

Three forms are read: plain image objects, WebDataset ``.tar`` shards (one row per sample), and
Parquet files with an image-bytes column (one row per table row). Rows carry encoded bytes, never
decoded pixels, so the object store holds compact data until the decode stage.
"""

from __future__ import annotations

import io
import os
import stat
import tarfile
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import PurePosixPath

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray.data

from ngt_ray.errors import ErrorKind, RowError
from ngt_ray.job.contracts import error_columns, errors_of
from ngt_ray.job.fetch import fetch
from ngt_ray.storage import Location, object_too_large

__all__ = ["FORMATS", "IMAGE_SUFFIXES", "Listed", "detect_format", "list_entries", "list_objects", "pick_column",
           "read_source"]

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


_LISTED_SCHEMA = pa.schema([("path", pa.string()), ("size", pa.int64()), ("problem", pa.string()),
                            ("problem_kind", pa.string())])
_OBJECTS_PER_READ = 256  # objects one read call fetches (concurrently, on object stores)


@dataclass(frozen=True)
class Listed:
    """One object of the job's listing: its path, its size where the listing says (-1 where it does
    not), and why it cannot be read as an object (None where it can)."""

    path: str
    size: int = -1
    problem: RowError | None = None


def list_entries(loc: Location) -> list[Listed]:
    """Every object under ``loc`` (or ``loc`` itself if it is one), sorted by path.

    This listing decides what the objects are, and each one gets a row: nothing is skipped for its
    name (``.hidden``, ``_underscore``, and folders so named, are listed too). On a local filesystem
    every entry that is not a folder is an object: a symlink to a file is read through the link
    (the row names the link), while a dangling symlink, a symlink to a folder (never followed: links
    may loop, or lead out of the bucket), a FIFO or a socket is listed with the reason it is not
    read, and so is a subfolder that cannot be listed. Listing errors on ``loc`` itself, such as
    bad credentials, are raised, not mistaken for an empty prefix.
    """
    local = "file" in loc.fs.protocol
    if loc.fs.isfile(loc.path):
        return [_local_entry(loc.path) if local else Listed(loc.path, int(loc.fs.size(loc.path)))]
    if local:
        entries = list(_walk_local(loc.path)) if os.path.isdir(loc.path) else []
    else:
        found = loc.fs.find(loc.path, detail=True)
        entries = [Listed(path, -1 if info.get("size") is None else int(info["size"])) for path, info in found.items()]
    if not entries and not loc.fs.exists(loc.path):
        raise FileNotFoundError(f"no objects under {loc.url}")
    return sorted(entries, key=lambda entry: entry.path)


def list_objects(loc: Location) -> list[str]:
    """The paths of ``list_entries(loc)``."""
    return [entry.path for entry in list_entries(loc)]


def _walk_local(root: str) -> Iterator[Listed]:
    """Every entry under a local folder that is not a folder; symlinks to folders are not followed."""
    folders = [root]
    while folders:
        folder = folders.pop()
        try:
            with os.scandir(folder) as found:
                children = list(found)
        except OSError as exc:
            if folder == root:
                raise
            yield Listed(folder, problem=RowError(ErrorKind.NOT_A_FILE, f"folder cannot be listed ({exc.strerror})"))
            continue
        for child in children:
            if child.is_dir(follow_symlinks=False):
                folders.append(child.path)
            else:
                yield _local_entry(child.path)


_FILE_TYPES = ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
               (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))


def _local_entry(path: str) -> Listed:
    """A local path as an object: a regular file, or a symlink to one, is read; anything else is
    never opened (a FIFO would block the reader forever), its row says what it is."""
    link = os.path.islink(path)
    try:
        info = os.stat(path)  # follows a symlink
    except FileNotFoundError:
        return Listed(path, problem=RowError(ErrorKind.NOT_A_FILE, "symlink target missing") if link else
                      RowError(ErrorKind.READ, "read failed: vanished since listed"))
    except OSError as exc:  # a symlink loop, a folder on the way that cannot be searched
        return Listed(path, problem=RowError(ErrorKind.NOT_A_FILE,
                                             f"{'symlink' if link else 'file'} cannot be followed ({exc.strerror})"))
    if stat.S_ISREG(info.st_mode):
        return Listed(path, info.st_size)
    what = next((name for test, name in _FILE_TYPES if test(info.st_mode)), "a special file")
    return Listed(path, problem=RowError(
        ErrorKind.NOT_A_FILE, f"not a regular file: {'a symlink to ' if link else ''}{what}"
                              f"{' (links to folders are not followed)' if link and what == 'a folder' else ''}"))


def _read_objects(batch: dict[str, np.ndarray], loc: Location) -> dict[str, np.ndarray]:
    """``(bytes, error, error_kind, read_attempts)`` columns for a batch of object paths (``_read_listed`` names
    the rows).

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
    errors = [None if isinstance(value, bytes) else RowError(ErrorKind.READ, str(value)) for value in got.results]
    return {"bytes": np.array(blobs, dtype=object), **error_columns(errors),
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
        shard = loc.object_uri(path)
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


def _read_listed(batch: dict[str, np.ndarray], loc: Location) -> dict[str, np.ndarray]:
    """``_read_objects`` for the objects that can be read; a row with the reason for the others.

    An object that is not a regular file or is over ``MAX_OBJECT_BYTES`` is never read: by the
    listing's word (``problem``, ``size``), or, for a manifest's paths on a local filesystem, by
    looking at each path first. One read over the limit anyway (no size listed) is dropped for an
    error row before it travels on. Every row is named by its ``object_uri``.
    """
    paths = [str(p) for p in batch["path"]]
    if "problem" in batch:
        problems = errors_of(batch["problem"], batch["problem_kind"])
        entries = [Listed(*row) for row in zip(paths, map(int, batch["size"]), problems)]
    elif "file" in loc.fs.protocol:
        entries = [_local_entry(p) for p in paths]
    else:
        entries = [Listed(p) for p in paths]
    errors = [entry.problem or object_too_large(entry.size) for entry in entries]
    todo = [i for i, error in enumerate(errors) if error is None]
    # read even when every row has its reason: the reader's own columns come out all the same
    read = _read_objects({"path": np.array([paths[i] for i in todo], dtype=object),
                          "size": np.array([entries[i].size for i in todo], dtype=np.int64)}, loc)
    blobs = np.full(len(paths), b"", dtype=object)
    for i, blob, error in zip(todo, read["bytes"], errors_of(read["error"], read["error_kind"])):
        too_large = object_too_large(len(blob))
        blobs[i] = b"" if too_large else blob
        errors[i] = too_large or error
    out = {"uri": np.array([loc.object_uri(p) for p in paths], dtype=object), "bytes": blobs,
           **error_columns(errors)}
    for name, column in read.items():  # any other column the reader makes; rows it did not read: zero
        if name not in out:
            out[name] = np.zeros(len(paths), dtype=column.dtype)
            out[name][todo] = column
    return out


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
) -> tuple[ray.data.Dataset, int | None]:
    """A lazy Dataset of ``{"uri": str, "bytes": bytes}`` rows for the objects under ``loc``, and
    how many objects the listing found (those an earlier attempt wrote included), or None where
    nothing is listed on the driver (a manifest, packed inputs whose rows are samples).

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
    listed = None
    if fmt == "images":
        if paths is None:
            # Listed once on the driver (as Ray's file readers do), then read in batches: Ray's
            # read_binary_files builds a one-row table per object, ~200 us of CPU each.
            entries = list_entries(loc)
            listed = len(entries)
            todo = [{"path": e.path, "size": e.size, "problem": e.problem and e.problem.message,
                     "problem_kind": e.problem and e.problem.kind} for e in entries
                    if loc.object_uri(e.path) not in skip]
            # blocks of exactly ``per_read`` entries (from_items would split them evenly: 2000 into
            # 8 x 250), so every later batch of ``block_rows`` is one block: a batch that straddles two
            # blocks is a concatenation, and after decode that copies every pixel of the batch
            table = pa.Table.from_pylist(todo, schema=_LISTED_SCHEMA)
            paths = ray.data.from_arrow([table.slice(i, per_read) for i in range(0, max(len(todo), 1), per_read)])
        elif skip:
            paths = paths.filter(lambda row: loc.object_uri(row["path"]) not in skip)
        return paths.map_batches(_read_listed, fn_kwargs={"loc": loc}, batch_size=per_read,
                                 batch_format="numpy", **tasks), listed
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
            uris = [f"{loc.object_uri(p)}#{k}" for p, k in zip(batch["path"], batch[key])]
            return {"uri": np.array(uris, dtype=object), "bytes": batch[image]}

        ds = ds.map_batches(to_rows, batch_format="numpy", **tasks)
    else:
        raise ValueError(f"input format must be one of {('auto', *FORMATS)}, got {fmt!r}")
    if skip:
        ds = ds.map_batches(_unfinished, fn_kwargs={"skip": skip}, batch_format="numpy", **tasks)
    return ds, listed
