"""Object-storage inputs as a Ray Dataset of ``(uri, bytes)`` rows, whatever their packaging.

Three forms are read: plain image objects, WebDataset ``.tar`` shards (one row per sample), and
Parquet files with an image-bytes column (one row per table row). Rows carry encoded bytes, never
decoded pixels, so the object store holds compact data until the decode stage.

Every form is listed on the driver and read through ``ngt_ray.job.fetch`` (counted retries,
classified errors). A shard or Parquet file (a container) is read whole when it fits in
``MAX_OBJECT_BYTES``, else piece by piece (ranged reads, each retried). A container that cannot be
read, or is not a shard or a table, is ONE error row named by the container's uri (its samples
cannot be counted); samples read before a failure part-way keep their rows.
"""

from __future__ import annotations

import io
import os
import stat
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import PurePosixPath

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray.data

from ngt_ray.errors import ErrorKind, RowError
from ngt_ray.job.contracts import error_columns, errors_of
from ngt_ray.job.fetch import FetchError, clean, fetch
from ngt_ray.job.resume import Finished
from ngt_ray.storage import MAX_OBJECT_BYTES, Location, object_too_large

__all__ = ["FORMATS", "IMAGE_SUFFIXES", "Listed", "detect_format", "list_entries", "list_objects", "pick_column",
           "read_samples", "read_source"]

FORMATS = ("images", "webdataset", "parquet")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp")
_KEY_COLUMNS = ("uri", "url", "key", "path", "id", "name", "__key__")
_IMAGE_COLUMNS = ("image", "bytes", "jpg", "jpeg", "png", "img", "content")


def _first_object(loc: Location, suffix: str = "") -> str:
    """The first visible object under ``loc`` (``loc`` itself if it is a file), ending in ``suffix``.

    ``fs.walk`` is lazy across folders, so this stays cheap on a bucket of a billion objects; a local
    folder is read an entry at a time (fsspec's walk would hold a detailed entry per file of a flat
    folder: a million files, most of a GiB on the driver). Listing errors such as bad credentials
    are raised, not mistaken for an empty prefix.
    """
    if loc.fs.isfile(loc.path):
        return loc.path
    if "file" in loc.fs.protocol:
        found = _first_local(loc.path, suffix)
        if found is not None:
            return found
        raise FileNotFoundError(f"no {suffix or 'objects'}{' files' if suffix else ''} under {loc.url}")
    for root, _dirs, files in loc.fs.walk(loc.path, on_error="raise"):
        for f in sorted(files):
            if f.endswith(suffix) and not f.startswith((".", "_")):
                return f"{root}/{f}"
    raise FileNotFoundError(f"no {suffix or 'objects'}{' files' if suffix else ''} under {loc.url}")


def _first_local(root: str, suffix: str) -> str | None:
    """``_first_object`` under a local folder: the smallest visible name ending in ``suffix`` of the
    first folder that has one, folders top-down and in order of name (links to folders not followed)."""
    folders = [root]
    while folders:
        folder = folders.pop(0)
        best, below = None, []
        with os.scandir(folder) as entries:
            for entry in entries:
                if entry.is_dir(follow_symlinks=False):
                    below.append(entry.path)
                elif entry.name.endswith(suffix) and not entry.name.startswith((".", "_")) and \
                        (best is None or entry.name < best):
                    best = entry.name
        if best is not None:
            return f"{folder}/{best}"
        folders[:0] = sorted(below)
    return None


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
    entries = sorted(_entries(loc), key=lambda entry: entry.path)
    if not entries and not loc.fs.exists(loc.path):
        raise FileNotFoundError(f"no objects under {loc.url}")
    return entries


def _entries(loc: Location) -> Iterator[Listed]:
    """``list_entries(loc)``, unsorted, one at a time."""
    local = "file" in loc.fs.protocol
    if loc.fs.isfile(loc.path):
        yield _local_entry(loc.path) if local else Listed(loc.path, int(loc.fs.size(loc.path)))
    elif local:
        if os.path.isdir(loc.path):
            yield from _walk_local(loc.path)
    else:
        for path, info in loc.fs.find(loc.path, detail=True).items():
            yield Listed(path, -1 if info.get("size") is None else int(info["size"]))


_LISTING_CHUNK = 2**16  # entries made into Arrow at once


def _listing(loc: Location) -> pa.Table:
    """``list_entries(loc)`` as a ``_LISTED_SCHEMA`` table, made into Arrow a chunk at a time and sorted
    there: a bucket of millions of objects is never millions of Python objects on the driver."""
    chunks: list[pa.RecordBatch] = []
    chunk: list[Listed] = []
    for entry in _entries(loc):
        chunk.append(entry)
        if len(chunk) == _LISTING_CHUNK:
            chunks.append(_listed_batch(chunk))
            chunk = []
    chunks.append(_listed_batch(chunk))
    table = pa.Table.from_batches(chunks, schema=_LISTED_SCHEMA).combine_chunks()
    del chunks  # two copies at most while sorting: this one and the sorted one
    if not table.num_rows and not loc.fs.exists(loc.path):
        raise FileNotFoundError(f"no objects under {loc.url}")
    return table.take(pc.sort_indices(table["path"]))  # by UTF-8 bytes: code points, as ``sorted`` orders paths


def _listed_batch(entries: list[Listed]) -> pa.RecordBatch:
    return pa.record_batch([[e.path for e in entries], [e.size for e in entries],
                            [e.problem and e.problem.message for e in entries],
                            [e.problem and e.problem.kind.value for e in entries]], schema=_LISTED_SCHEMA)


def list_objects(loc: Location) -> list[str]:
    """The paths of ``list_entries(loc)``."""
    return [entry.path for entry in list_entries(loc)]


def _walk_local(root: str) -> Iterator[Listed]:
    """Every entry under a local folder that is not a folder; symlinks to folders are not followed.

    A folder's entries are yielded as they are read, never held (a folder of millions of objects is
    not millions of ``DirEntry`` objects at once); one whose listing fails part-way keeps the rows of
    the entries read before, and gets its own row with the reason."""
    folders = [root]
    while folders:
        folder = folders.pop()
        try:
            found = os.scandir(folder)
        except OSError as exc:
            if folder == root:
                raise
            yield Listed(folder, problem=RowError(ErrorKind.NOT_A_FILE, f"folder cannot be listed ({exc.strerror})"))
            continue
        with found:
            try:
                for child in found:
                    if child.is_dir(follow_symlinks=False):
                        folders.append(child.path)
                    else:
                        yield _local_entry(child.path)
            except OSError as exc:
                if folder == root:
                    raise
                yield Listed(folder, problem=RowError(ErrorKind.NOT_A_FILE,
                                                      f"folder cannot be listed ({exc.strerror})"))


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


_CONTAINERS = {"webdataset": (".tar", "WebDataset shard"), "parquet": (".parquet", "Parquet file")}
_RANGE_BYTES = 8 * 2**20  # one ranged read of a container too large to read whole
_FOOTER_BYTES = 2**16  # one ranged read of a Parquet footer (its schema)


def _list_containers(loc: Location, fmt: str) -> list[Listed]:
    """The shards (``.tar``) or Parquet files under ``loc``, as ``list_entries`` lists them; names
    starting with ``.`` or ``_`` are a dataset's metadata (``_SUCCESS``, ``_metadata``), not data."""
    suffix, what = _CONTAINERS[fmt]
    found = [e for e in list_entries(loc) if e.path.lower().endswith(suffix)
             and not PurePosixPath(e.path).name.startswith((".", "_"))]
    if not found:
        raise FileNotFoundError(f"no {suffix} files under {loc.url}")
    return found


class _PieceFailed(Exception):
    """A ranged read of a container still failed after the fetch layer's attempts."""

    def __init__(self, error: FetchError) -> None:
        super().__init__(str(error))
        self.error = error


class _RangedObject(io.RawIOBase):
    """One object as a seekable read-only file whose reads are ``fetch``es of byte ranges, at least
    ``chunk`` bytes each (kept until read past): a container too large to hold whole is read piece by
    piece, each piece retried. A piece that still fails raises ``_PieceFailed``."""

    def __init__(self, loc: Location, path: str, size: int, chunk: int = _RANGE_BYTES) -> None:
        super().__init__()
        self.loc, self.path, self.size, self.chunk = loc, path, size, chunk
        self.pos, self.window_at, self.window = 0, 0, b""

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        self.pos = {io.SEEK_SET: 0, io.SEEK_CUR: self.pos, io.SEEK_END: self.size}[whence] + offset
        return self.pos

    def read(self, n: int | None = -1) -> bytes:
        end = self.size if n is None or n < 0 else min(self.size, self.pos + n)
        if end <= self.pos:
            return b""
        if not self.window_at <= self.pos <= end <= self.window_at + len(self.window):
            stop = min(self.size, max(end, self.pos + self.chunk))
            [got] = fetch(self.loc.fs, [self.path], ranges=[(self.pos, stop)]).results
            if isinstance(got, FetchError):
                raise _PieceFailed(got)
            self.window_at, self.window = self.pos, got
        out = self.window[self.pos - self.window_at: end - self.window_at]
        self.pos = end
        return out

    def readinto(self, buffer) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)


def _tar_samples(source: io.RawIOBase) -> Iterator[tuple[str, bytes | None]]:
    """The WebDataset samples of a tar, in order: members sharing a key (the path up to the first dot
    of the name) form a sample, its image the first member with an image suffix (None: no image). A
    sample's members are adjacent, as WebDataset writes them (so a shard streams); a member that comes
    back to a sample already passed is ignored."""
    passed: set[str] = set()
    key, image = None, None
    with tarfile.open(fileobj=source, mode="r|*") as tar:
        for member in tar:
            name = PurePosixPath(member.name)
            this = str(name.parent / name.name.split(".", 1)[0])
            if not member.isfile() or this in passed:
                continue
            if this != key:
                if key is not None:
                    yield key, image
                    passed.add(key)
                key, image = this, None
            if image is None and name.suffix.lower() in IMAGE_SUFFIXES:
                image = tar.extractfile(member).read()
    if key is None:
        raise tarfile.ReadError("shard holds no samples")
    yield key, image


def _table_samples(source: io.RawIOBase | pa.BufferReader, columns: tuple[str, str],
                   rows: int, chunk: int = _RANGE_BYTES) -> Iterator[tuple[object, bytes | None]]:
    """``(key, image bytes)`` of every row of a Parquet file, reading only those two columns, ``rows``
    at a time. A file read in pieces is read ``chunk`` bytes at a time, or a page where a page is
    larger (pyarrow writes a page per 1024 values), never a whole row group at once."""
    key, image = columns
    if isinstance(source, pa.BufferReader):
        table = pq.ParquetFile(source)
    else:
        table = pq.ParquetFile(pa.PythonFile(source, mode="r"), buffer_size=chunk, pre_buffer=False)
    missing = [c for c in (key, image) if c not in table.schema_arrow.names]
    if missing:
        raise ValueError(f"no column {missing[0]!r} (columns: {table.schema_arrow.names})")
    for batch in table.iter_batches(batch_size=rows, columns=[key, image], use_threads=False):
        yield from zip(batch.column(key).to_pylist(), batch.column(image).to_pylist())


def _rows(uris: list[str], blobs: list[bytes], errors: list[RowError | None]) -> dict[str, np.ndarray]:
    return {"uri": np.array(uris, dtype=object), "bytes": np.array(blobs, dtype=object), **error_columns(errors)}


def _read_containers(batch: dict[str, np.ndarray], loc: Location, fmt: str, columns: tuple[str, str] | None = None,
                     rows: int = _OBJECTS_PER_READ, whole: int = MAX_OBJECT_BYTES,
                     chunk: int = _RANGE_BYTES) -> Iterator[dict[str, np.ndarray]]:
    """One row per sample (a shard's) or table row (a Parquet file's) of the listed containers, ``rows``
    at a time, named ``container#key``.

    A container of at most ``whole`` bytes is read with one ``fetch`` (retried, classified), a larger
    one in ranged reads of ``chunk`` bytes or more, each retried, so no read holds more than a piece.
    A container that cannot be read (after every attempt), or is not a shard or a table (or lacks the
    key or image column), is one error row named by its uri: its samples cannot be counted. One that
    fails part-way keeps the rows of the samples read before, and the error row says how many. A
    bucket or store that cannot be read raises ``StorageError`` from ``fetch``: the run stops.
    """
    what = _CONTAINERS[fmt][1]
    for path, size, message, kind in zip(batch["path"], batch["size"], batch["problem"], batch["problem_kind"]):
        container, size = loc.object_uri(str(path)), int(size)
        if message:  # the listing's word: not a regular file
            yield _rows([container], [b""], [RowError(ErrorKind(kind), str(message))])
            continue
        if size <= whole:  # unknown sizes (-1) included: read whole, as images are
            [got] = fetch(loc.fs, [str(path)], sizes=[size if size >= 0 else None]).results
            if isinstance(got, FetchError):
                yield _rows([container], [b""], [RowError(ErrorKind.READ, str(got))])
                continue
            source = pa.BufferReader(got) if fmt == "parquet" else io.BytesIO(got)
        else:
            source = _RangedObject(loc, str(path), size, chunk)
        samples = _tar_samples(source) if fmt == "webdataset" else _table_samples(source, columns, rows, chunk)
        uris: list[str] = []
        blobs: list[bytes] = []
        done, error = 0, None
        try:
            for key, blob in samples:
                uris.append(f"{container}#{key}")
                blobs.append(blob or b"")
                if len(uris) == rows:
                    yield _rows(uris, blobs, [None] * rows)
                    done, uris, blobs = done + rows, [], []
        except _PieceFailed as exc:
            error = str(exc.error)
        except (tarfile.TarError, OSError, EOFError, ValueError, pa.ArrowException) as exc:
            error = clean(f"not a readable {what}: {type(exc).__name__}: {exc}")
        if error is not None:
            read = done + len(uris)
            uris.append(container)
            blobs.append(b"")
            if read:
                error += f" (the {read} samples before it have rows of their own)"
        if uris:
            yield _rows(uris, blobs, [None] * (len(uris) - (error is not None)) +
                        ([RowError(ErrorKind.READ, error)] if error is not None else []))


def read_samples(loc: Location, containers: list[str], *, image_column: str | None = None,
                 key_column: str | None = None) -> Iterator[tuple[str, bytes, RowError | None]]:
    """``(uri, image bytes, error)`` of every sample of whole containers (WebDataset shards, or Parquet
    files by their suffix), read and named as the job reads and names them (``container#key``): for
    tools that look a packed sample up by its uri, such as the report's thumbnails."""
    for path in containers:
        fmt = "parquet" if path.endswith(".parquet") else "webdataset"
        columns = _parquet_columns(loc, [Listed(path)], image_column, key_column) if fmt == "parquet" else None
        batch = {"path": [path], "size": [-1], "problem": [None], "problem_kind": [None]}
        for rows in _read_containers(batch, loc, fmt, columns):
            yield from zip(rows["uri"], rows["bytes"], errors_of(rows["error"], rows["error_kind"]))


def _parquet_columns(loc: Location, entries: list[Listed], image_column: str | None,
                     key_column: str | None) -> tuple[str, str]:
    """``(key, image)`` columns, from the schema of the first listed Parquet file whose footer can be read
    (ranged reads through ``fetch``)."""
    for entry in entries:
        if entry.problem is not None:
            continue
        try:
            size = entry.size if entry.size >= 0 else loc.fs.size(entry.path)
            names = pq.ParquetFile(pa.PythonFile(_RangedObject(loc, entry.path, size, _FOOTER_BYTES),
                                                 mode="r")).schema_arrow.names
        except (_PieceFailed, OSError, ValueError, pa.ArrowException):
            continue
        where = loc.uri(entry.path)
        image = pick_column(names, image_column, _IMAGE_COLUMNS, "image", where)
        return pick_column(names, key_column, _KEY_COLUMNS, "key", where), image
    raise FileNotFoundError(f"no readable Parquet file under {loc.url} to take the key and image columns from")


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


def _unwritten(batch: pa.Table, done: Finished, loc: Location | None = None) -> pa.Table:
    """The rows of ``batch`` that no earlier attempt of the run wrote, by their ``uri``, or by the
    ``object_uri`` of their ``path``: ``done`` loads only the flags files whose uri range holds the
    batch's keys (``ngt_ray.job.resume``). Arrow in and out, so a column keeps its type (an all-null
    ``problem`` stays strings)."""
    uris = batch["uri"].to_pylist() if "uri" in batch.column_names else \
        [loc.object_uri(p) for p in batch["path"].to_pylist()]
    return batch.filter(pa.array(~done.written(uris)))


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
    skip: Finished | None = None,
    task_cpus: float = 1.0,
    block_rows: int = _OBJECTS_PER_READ,
) -> tuple[ray.data.Dataset, int | None]:
    """A lazy Dataset of ``{"uri": str, "bytes": bytes}`` rows for the objects under ``loc``, and
    how many objects the listing found (those an earlier attempt wrote included), or None where
    nothing is listed on the driver (a manifest, packed inputs whose rows are samples).

    ``paths``: a Dataset of ``{"path": ...}`` rows (from a manifest) read instead of listing ``loc``.
    ``skip``: what earlier attempts of the run wrote (``RunOutput.done``), looked up by each read task
    for its own keys: an object, or a container whose error row is written, is never read again; a
    shard's or a table's samples already written are dropped before decode.
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
            table = _listing(loc)
            listed = table.num_rows
            # blocks of exactly ``per_read`` entries (from_items would split them evenly: 2000 into
            # 8 x 250), so every later batch of ``block_rows`` is one block: a batch that straddles two
            # blocks is a concatenation, and after decode that copies every pixel of the batch
            paths = ray.data.from_arrow([table.slice(i, per_read) for i in range(0, max(listed, 1), per_read)])
        if skip:  # each block drops its own rows already written, before any read (decode regroups the rest)
            paths = paths.map_batches(_unwritten, fn_kwargs={"done": skip, "loc": loc}, batch_size=None,
                                      batch_format="pyarrow", **tasks)
        return paths.map_batches(_read_listed, fn_kwargs={"loc": loc}, batch_size=per_read,
                                 batch_format="numpy", **tasks), listed
    if fmt in _CONTAINERS:
        # listed on the driver like images, one container per block: each is read (and expanded) by
        # one task, through the fetch layer; a container with an error row is not read again
        entries = _list_containers(loc, fmt)
        columns = _parquet_columns(loc, entries, image_column, key_column) if fmt == "parquet" else None
        todo = [{"path": e.path, "size": e.size, "problem": e.problem and e.problem.message,
                 "problem_kind": e.problem and e.problem.kind} for e in entries]
        table = pa.Table.from_pylist(todo, schema=_LISTED_SCHEMA)
        ds = ray.data.from_arrow([table.slice(i, 1) for i in range(max(len(todo), 1))])
        if skip:  # a container whose error row is written is not read again
            ds = ds.map_batches(_unwritten, fn_kwargs={"done": skip, "loc": loc}, batch_size=1,
                                batch_format="pyarrow", **tasks)
        ds = ds.map_batches(
            _read_containers, fn_kwargs={"loc": loc, "fmt": fmt, "columns": columns, "rows": per_read}, batch_size=1,
            batch_format="numpy", **tasks)
    else:
        raise ValueError(f"input format must be one of {('auto', *FORMATS)}, got {fmt!r}")
    if skip:
        ds = ds.map_batches(_unwritten, fn_kwargs={"done": skip}, batch_format="pyarrow", **tasks)
    return ds, listed
