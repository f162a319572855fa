"""What earlier attempts of a run already wrote, read per key range instead of held whole.

A resumed run skips every object already in ``flags/``. At bucket scale the uris written are too
many for one set on the driver (100M uris: gigabytes, and again in every read task that carries
them), so the flags are their own index: each file's Parquet footer holds its row count and the
min and max of its ``uri`` column. The driver reads only the footers (``Finished.of``: a few kB per
file, ~4096 rows each), and a read task asks ``Finished.written`` about the uris of its batch,
which loads the ``uri`` column of just the files whose [min, max] holds one of them.

A listing is sorted by path and written in input order (``--ordered``), so a flags file covers a
narrow key range and a batch meets one or two files. Inputs out of order (an unsorted manifest, or
flags written unordered) widen the ranges: still exact, since a file's range holds every uri in it,
but a batch loads more files, each kept for the next batches in a small cache per process.
"""

from __future__ import annotations

import bisect
import logging
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ngt_ray.job.fetch import OBJECT, FetchError, fetch
from ngt_ray.storage import Location

log = logging.getLogger(__name__)

__all__ = ["Finished"]

_FILES_SCHEMA = pa.schema([("path", pa.string()), ("rows", pa.int64()), ("min", pa.string()), ("max", pa.string())])
_TAIL_BYTES = 2**16  # one ranged read of a flags file's end: its footer
_FOOTERS_PER_FETCH = 512  # footers read concurrently by one fetch call
_CACHE_BYTES = 64 * 2**20  # uri columns a process keeps for the next batches
_cache: OrderedDict[tuple[str, int], pa.Array] = OrderedDict()


class _CutShort(Exception):
    """A flags file with no readable footer: a write cut short by a kill."""


class _Gone(Exception):
    """A flags file deleted since it was listed."""


@dataclass(frozen=True)
class Finished:
    """The complete flags files of a run's output, as one row each: path, rows, and min and max
    ``uri`` (null where the footer has no statistics: such a file may hold any uri), sorted by min.

    ``len()`` is the rows already written. Small (a few hundred bytes per file, not per row), so it
    travels to every read task as it is.
    """

    flags: Location | None = None
    files: pa.Table = field(default_factory=_FILES_SCHEMA.empty_table)

    def __len__(self) -> int:
        return int(pc.sum(self.files["rows"]).as_py() or 0)

    def __bool__(self) -> bool:
        return self.files.num_rows > 0

    @classmethod
    def of(cls, flags: Location) -> Finished:
        """The index of the complete files under ``flags``, from their footers alone (ranged reads
        through ``ngt_ray.job.fetch``). A file cut short by a kill (no footer) is removed: its rows
        are redone. A file that cannot be read after every attempt stops the run: whether its rows
        are written cannot be told, and guessing would skip or duplicate them."""
        fs = flags.fs
        fs.invalidate_cache()
        if not fs.exists(flags.path):
            return cls(flags)
        found = sorted((path, int(info.get("size") or 0)) for path, info in fs.find(flags.path, detail=True).items()
                       if path.endswith(".parquet"))
        rows: list[tuple[str, int, str | None, str | None]] = []
        for start in range(0, len(found), _FOOTERS_PER_FETCH):
            chunk = found[start:start + _FOOTERS_PER_FETCH]
            for (path, size), tail in zip(chunk, _tails(flags, chunk)):
                try:
                    rows.append((path, *_footer(flags, path, size, tail)))
                except _Gone:  # deleted since listed: nothing of it to skip
                    continue
                except _CutShort as exc:
                    log.warning("removing %s, cut short by an interrupted run (%s); its rows are redone",
                                flags.uri(path), exc)
                    fs.rm(path)
        rows.sort(key=lambda row: row[2] or "")  # by min (unknown first)
        return cls(flags, pa.Table.from_pylist([dict(zip(_FILES_SCHEMA.names, row)) for row in rows if row[1]],
                                               schema=_FILES_SCHEMA))

    def written(self, uris: Sequence[str]) -> np.ndarray:
        """For each of ``uris``: whether a file of this index holds it (a bool array)."""
        if not self or not len(uris):
            return np.zeros(len(uris), dtype=bool)
        wanted = self._holding(sorted(set(uris)))
        if not wanted:
            return np.zeros(len(uris), dtype=bool)
        done = pa.concat_arrays([self._uris(path, rows) for path, rows in wanted])
        return pc.is_in(pa.array(uris, pa.string()), value_set=done).to_numpy(zero_copy_only=False)

    def _holding(self, ordered: list[str]) -> list[tuple[str, int]]:
        """The files whose [min, max] holds one of ``ordered`` (sorted uris): a bisection on each side,
        then one more per file in between, so a batch costs the files near its keys, not all of them."""
        anywhere, lows, reach, highs, files = self._bounds
        out = list(anywhere)
        # files before ``first`` all end before the smallest uri; from ``last`` on, start after the largest
        first, last = bisect.bisect_left(reach, ordered[0]), bisect.bisect_right(lows, ordered[-1])
        for i in range(first, last):
            at = bisect.bisect_left(ordered, lows[i])  # the first uri at or after this file's min
            if at < len(ordered) and ordered[at] <= highs[i]:
                out.append(files[i])
        return out

    @cached_property
    def _bounds(self) -> tuple[list[tuple[str, int]], list[str], list[str], list[str], list[tuple[str, int]]]:
        """The files with no bounds (``(path, rows)``), and of the others (in order of min): min, the
        largest max so far (never decreasing: what bisects the files that end too early), max and
        ``(path, rows)``."""
        rows = zip(self.files["path"].to_pylist(), self.files["rows"].to_pylist(), self.files["min"].to_pylist(),
                   self.files["max"].to_pylist())
        anywhere, lows, reach, highs, files = [], [], [], [], []
        for path, count, low, high in rows:
            if low is None or high is None:
                anywhere.append((path, count))
                continue
            lows.append(low)
            highs.append(high)
            reach.append(max(high, reach[-1]) if reach else high)
            files.append((path, count))
        return anywhere, lows, reach, highs, files

    def _uris(self, path: str, rows: int) -> pa.Array:
        """The ``uri`` column of one flags file, read through ``fetch`` (a file is written once and never
        changes, so a process keeps the last ones it read)."""
        key = (path, rows)
        if key in _cache:
            _cache.move_to_end(key)
            return _cache[key]
        [got] = fetch(self.flags.fs, [path]).results
        if isinstance(got, FetchError):  # listed complete by the driver: rows would be redone, or skipped
            raise RuntimeError(f"cannot read the uris already written in {self.flags.uri(path)}: {got}")
        uris = pq.read_table(pa.BufferReader(got), columns=["uri"]).column("uri").combine_chunks()
        _cache[key] = uris
        while len(_cache) > 1 and sum(a.nbytes for a in _cache.values()) > _CACHE_BYTES:
            _cache.popitem(last=False)
        return uris


def _tails(flags: Location, files: list[tuple[str, int]]) -> list[bytes | FetchError]:
    """The last ``_TAIL_BYTES`` of each file (its footer, for any flags file), read concurrently;
    a file too short to hold a footer is not read (b"")."""
    todo = [i for i, (_, size) in enumerate(files) if size >= 12]
    got = fetch(flags.fs, [files[i][0] for i in todo],
                ranges=[(max(0, files[i][1] - _TAIL_BYTES), files[i][1]) for i in todo]).results
    out: list[bytes | FetchError] = [b""] * len(files)
    for i, value in zip(todo, got):
        out[i] = value
    return out


def _footer(flags: Location, path: str, size: int, tail: bytes | FetchError) -> tuple[int, str | None, str | None]:
    """Rows, min and max ``uri`` of a flags file, from ``tail``, its last bytes (the whole file is
    read where its footer is longer). ``_CutShort`` where it has no footer, ``_Gone`` where it is
    deleted; a file that cannot be read after every attempt stops the run: whether its rows are
    written cannot be told, and guessing would skip or duplicate them."""
    if isinstance(tail, bytes) and len(tail) < size and tail[-4:] == b"PAR1" and \
            int.from_bytes(tail[-8:-4], "little") + 8 > len(tail):  # a footer longer than the tail read
        [tail] = fetch(flags.fs, [path], sizes=[size]).results
    if isinstance(tail, FetchError):
        if tail.kind == OBJECT and tail.code in ("NotFound", "NoSuchKey"):
            raise _Gone(tail.uri)
        raise RuntimeError(f"cannot tell which rows {tail.uri} holds: {tail}")
    if len(tail) < 12 or tail[-4:] != b"PAR1":
        raise _CutShort("no Parquet footer")
    try:
        meta = pq.read_metadata(pa.BufferReader(tail))
    except (OSError, ValueError) as exc:  # ArrowInvalid is a ValueError
        raise _CutShort(f"{type(exc).__name__}: {exc}") from None
    column = next((j for j in range(meta.num_columns) if meta.schema.column(j).path == "uri"), None)
    if column is None:
        raise RuntimeError(f"{flags.uri(path)} has no uri column: not a flags file")
    low = high = None
    for g in range(meta.num_row_groups):
        group = meta.row_group(g)
        stats = group.column(column).statistics
        if group.num_rows == 0:
            continue
        if stats is None or not stats.has_min_max:  # no statistics (a uri over 4 kB): it may hold any uri
            return meta.num_rows, None, None
        low = stats.min if low is None else min(low, stats.min)
        high = stats.max if high is None else max(high, stats.max)
    return meta.num_rows, low, high
