"""An output location that belongs to one run configuration, resumes, and is never half-presented.

Layout of ``<output>``:

    run.json          the configuration that owns this location (written before any flags)
    flags/*.parquet   one row per input object; files are only ever added by a run of that config
    stats.parquet     describes every row in flags/ (rewritten at the end of each run)
    _SUCCESS          written last: until it exists, nothing here is presented as complete
    _LEASE.json       the lease of the run writing here (ngt_ray.job.lease): there only while one runs

Why it is built this way:

- **Resume, never duplicate.** The uris already in ``flags/`` are the manifest of finished work. A
  re-run with the same configuration appends only the objects not yet written. A file cut short by
  a kill has no Parquet footer; it is removed and its rows are redone, so no row is counted twice.
  The driver reads only the files' footers (rows, min and max uri: ``ngt_ray.job.resume``); each read
  task looks up its own keys in the files whose range holds them, so no one holds every uri.
- **Never delete what is not yet replaced.** A run with another configuration is refused unless
  ``--overwrite``; then it writes to ``_staging-<config hash>/`` (itself resumable), and only when
  it is complete does it take the place of the old results.
- **No new buckets by accident.** On an object store the bucket must exist: a typo is an error.
- **One writer.** A run holds ``_LEASE.json`` here from ``open`` to its end (``ngt_ray.job.lease``):
  a second run into the same output refuses, or waits for it, rather than write every object twice.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from ngt_ray.job.fetch import put
from ngt_ray.job.resume import Finished
from ngt_ray.storage import Location, require_bucket, resolve

log = logging.getLogger(__name__)

__all__ = ["OutputError", "RunOutput", "output_location", "run_config"]

# Options that change where and how fast a run goes, never its rows: a resume may change them.
_OPERATIONAL = frozenset({"ray_address", "max_actors", "actors_per_gpu", "measure_time", "overwrite", "output",
                          "extra_info", "actor_start_timeout", "ordered", "batch_size", "rows_per_file",
                          "wait_for_lease", "report"})
SUCCESS = "_SUCCESS"
RUN_RECORD = "run.json"


class OutputError(RuntimeError):
    """The output location cannot take this run as asked (another run's config, no bucket, ...)."""


def _package_version() -> str:
    try:
        return version("ngt-ray")
    except PackageNotFoundError:  # a checkout on sys.path, not installed
        return "unknown"


def run_config(cfg: Any) -> dict[str, Any]:
    """The part of a job's config that decides its rows, as JSON-ready data."""
    fields = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if f.name not in _OPERATIONAL}
    return json.loads(json.dumps({"ngt_ray": _package_version(), **fields}, sort_keys=True, default=str))


def _config_hash(config: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:12]


def _differences(old: dict[str, Any], new: dict[str, Any]) -> str:
    keys = sorted(set(old) | set(new))
    return ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in keys if old.get(k) != new.get(k))


@dataclass
class RunOutput:
    """Where this run writes and what it may skip. ``open`` decides; ``commit`` presents."""

    root: Location  # <output>
    work: Location  # where this run's flags/ and run.json go: root, or its staging folder
    config: dict[str, Any]
    done: Finished  # what earlier attempts of this config wrote: flags files and their uri ranges, not the uris
    staged: bool
    lease: Any = None  # the run's OutputLease (ngt_ray.job.lease), held from open until the run ends

    @property
    def flags(self) -> Location:
        return self.work.join("flags")

    @classmethod
    def open(cls, output: str, config: dict[str, Any], s3_endpoint: str | None = None,
             overwrite: bool = False, lease: Any = None) -> RunOutput:
        root = output_location(output, s3_endpoint)
        if lease is not None:  # one writer per output: taken before anything here is read or written
            lease.acquire(root)
        record = _read_record(root)
        if record is not None and record != config:
            owner = f"the results of another configuration ({_differences(record, config)})"
        elif record is None and _has_files(root.join("flags")):
            owner = "flags that no ngt-ray run recorded"
        else:
            owner = None
        if owner and not overwrite:
            raise OutputError(f"{root.url} holds {owner}; choose another --output, or pass --overwrite to replace "
                              "them once this run is complete")
        staged = overwrite and (owner is not None or record is not None)
        work = root.join(f"_staging-{_config_hash(config)}") if staged else root
        out = cls(root, work, config, Finished(), staged, lease)
        out._begin()
        return out

    def _begin(self) -> None:
        fs = self.work.fs
        if "file" in fs.protocol:
            fs.makedirs(self.flags.path, exist_ok=True)
        if not self.staged:  # this location is about to change: it is not complete until commit
            _remove(self.root, SUCCESS)
            _remove(self.root, "stats.parquet")
        # every write here is one retried put (ngt_ray.job.fetch): complete or absent, on a flaky store too
        put(fs, self.work.join(RUN_RECORD).path, json.dumps(self.config, indent=2, sort_keys=True).encode())
        self.done = Finished.of(self.flags)  # footers only: flat on the driver however many rows
        if self.done:
            log.info("resuming %s: %d objects already written are skipped", self.work.url, len(self.done))

    def commit(self, stats: Any) -> None:
        """Present the run: stats.parquet beside its flags, then ``_SUCCESS`` (after swapping in a
        staged run, which only now deletes the results it replaces)."""
        if self.lease is not None:  # never presented beside another run: the lease must still be this run's
            self.lease.check()
        fs = self.root.fs
        if self.staged:
            _remove(self.root, SUCCESS)
            _remove(self.root, "stats.parquet")
            old = self.root.join("flags")
            if fs.exists(old.path):
                fs.rm(old.path, recursive=True)
            fs.mv(self.flags.path, old.path, recursive=True)
            fs.mv(self.work.join(RUN_RECORD).path, self.root.join(RUN_RECORD).path)
            fs.rm(self.work.path, recursive=True)
            self.work, self.staged = self.root, False
        table = pa.BufferOutputStream()
        pq.write_table(stats, table)
        put(fs, self.root.join("stats.parquet").path, table.getvalue().to_pybytes())
        put(fs, self.root.join(SUCCESS).path, b"")


def output_location(output: str, s3_endpoint: str | None = None) -> Location:
    """``output`` resolved, with its bucket checked (on an object store it must exist)."""
    root = resolve(output, s3_endpoint)
    require_bucket(root, "output", OutputError, hint="; create it first: ngt-ray never creates buckets, so a "
                                                     "typo cannot make a new one")
    return root


def _read_record(loc: Location) -> dict[str, Any] | None:
    path = loc.join(RUN_RECORD).path
    loc.fs.invalidate_cache()
    if not loc.fs.exists(path):
        return None
    with loc.fs.open(path) as f:
        return json.load(f)


def _has_files(loc: Location) -> bool:
    return bool(loc.fs.exists(loc.path) and loc.fs.find(loc.path))


def _remove(loc: Location, name: str) -> None:
    path = loc.join(name).path
    if loc.fs.exists(path):
        loc.fs.rm(path)
