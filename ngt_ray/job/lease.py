"""One writer per output: a lease on ``<output>/_LEASE.json``, taken before a run reads or writes
anything there, renewed while the run lives, released when it ends.

Two runs into one ``--output`` (a double submit, a scheduler's retry while the first attempt still
runs) would each skip only what *it* saw written and both write the rest: every object twice, and
two ``_SUCCESS``. With the lease the second run refuses, in one line naming the holder, or waits
(``--wait-for-lease``) until it can take the lease and then resumes from what the first one wrote.

The lease object, ``<output>/_LEASE.json``::

    {"holder": "host/pid/run", "host": "node-3", "pid": 4242, "run": "9f1c2ab04e7d",
     "started": "2026-12-05T05:36:18.250+00:00", "renewed": "...", "expires": "...", "ttl_seconds": 60.0}

- **Taken with a conditional create.** On a local disk ``os.open(..., O_CREAT | O_EXCL)``; on S3 a
  PutObject with ``If-None-Match: *``, which fails (412 PreconditionFailed) where the object exists.
- **Renewed** by a daemon thread every ttl/3: ``expires`` moves to now + ttl, written only over the
  object this run last wrote (S3: ``If-Match: <its ETag>``; a local disk compares it under an
  ``flock`` of the output folder, which every lease operation takes). A renewal that finds another
  holder there, or none, or that cannot reach the store until its own lease has expired, means the
  lease is lost: the run is interrupted (``LeaseLost``, one line) rather than write beside the new
  holder, and ``RunOutput.commit`` checks the lease again before it presents anything.
- **Taken over once expired**: ``expires`` in the past on the clock of the run that looks (hosts'
  clocks must agree to well under a ttl). The takeover replaces exactly the expired object it read
  (S3: ``If-Match`` its ETag), so of two runs racing for one expired lease, one wins; a holder killed
  with SIGKILL therefore blocks its output for at most a ttl.
- **Released** when the run ends, however it ends: deleted, and only while it is still this run's
  (S3: DeleteObject with ``If-Match``). ``_SUCCESS`` is the last result written; the lease goes after it.

Stores that ignore conditional writes: ``rclone serve s3`` (rclone 1.75, the loopback server most
tests use) accepts ``If-None-Match: *`` and ``If-Match`` and overwrites anyway, so a second
conditional put succeeds; moto's server (``moto.server.ThreadedMotoServer``, the lease tests' S3)
answers 412 PreconditionFailed as AWS S3 does (MinIO, Ceph RGW and R2 document the same). Before its
first lease write to an S3 store, a run probes it once (a PutObject with ``If-Match`` on a key that
does not exist must fail). Where the store ignores the condition, and on other fsspec protocols, the
lease falls back to create-then-verify: look, write, wait ``settle`` seconds, read the holder back. A
warning says so: two runs whose writes land within ``settle`` of each other can then both believe
they hold it.

Setting: ``NGT_RAY_LEASE_TTL`` (seconds, default 60). A shorter ttl frees a crashed run's output
sooner, for more renewals; every run into one output should use the same.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import signal
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

from fsspec.asyn import sync

from ngt_ray.job.outputs import OutputError
from ngt_ray.storage import Location, redact

log = logging.getLogger(__name__)

__all__ = ["LEASE", "TTL_ENV", "Holder", "LeaseError", "LeaseLost", "OutputLease", "honours_conditional_writes",
           "lease_ttl"]

LEASE = "_LEASE.json"
TTL_ENV = "NGT_RAY_LEASE_TTL"
DEFAULT_TTL = 60.0
SETTLE_SECONDS = 1.0  # create-then-verify: how long a write is given to be overwritten by a racing one


class LeaseError(OutputError):
    """Another live run holds the output's lease: this run refuses rather than write beside it."""


class LeaseLost(OutputError):
    """This run's lease was taken over or removed (or could not be renewed in time): it stops."""


def lease_ttl() -> float:
    """The lease's time to live: ``$NGT_RAY_LEASE_TTL`` seconds, or 60."""
    raw = os.environ.get(TTL_ENV)
    if not raw:
        return DEFAULT_TTL
    try:
        ttl = float(raw)
    except ValueError:
        raise ValueError(f"{TTL_ENV} must be a number of seconds, got {raw!r}") from None
    if not ttl > 0:
        raise ValueError(f"{TTL_ENV} must be positive, got {raw!r}")
    return ttl


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).isoformat(timespec="milliseconds")


def _epoch(text: str) -> float:
    return datetime.fromisoformat(text).timestamp()


@dataclass(frozen=True)
class Holder:
    """Who holds a lease, since when, and until when unless renewed."""

    host: str
    pid: int
    run: str
    started: float
    renewed: float
    expires: float
    ttl: float

    @property
    def id(self) -> str:
        return f"{self.host}/{self.pid}/{self.run}"

    def to_json(self) -> bytes:
        return json.dumps({"holder": self.id, "host": self.host, "pid": self.pid, "run": self.run,
                           "started": _iso(self.started), "renewed": _iso(self.renewed),
                           "expires": _iso(self.expires), "ttl_seconds": self.ttl}, indent=1).encode()

    @classmethod
    def parse(cls, data: bytes) -> Holder:
        """The holder a lease object names; an unreadable one (cut short, written by hand) names an
        unknown holder whose lease has expired, so it never blocks an output for good."""
        try:
            d = json.loads(data)
            return cls(str(d["host"]), int(d["pid"]), str(d["run"]), _epoch(d["started"]), _epoch(d["renewed"]),
                       _epoch(d["expires"]), float(d["ttl_seconds"]))
        except (ValueError, KeyError, TypeError):
            return cls("unknown host", 0, "unreadable lease", 0.0, 0.0, 0.0, 0.0)

    def describe(self, now: float) -> str:
        left = self.expires - now
        when = f"in {left:.0f} s" if left >= 0 else f"{-left:.0f} s ago"
        return (f"host {self.host}, pid {self.pid} (run {self.run}), since {_iso(self.started)}; its lease expires "
                f"{_iso(self.expires)} ({when}) unless renewed")


class _Store(Protocol):
    """The lease object as a compare-and-swap register; ``version`` names one write of it."""

    how: str  # how writes are made exclusive, for messages

    def read(self) -> tuple[bytes, str] | None: ...
    def create(self, data: bytes) -> str | None: ...  # None: it exists
    def replace(self, data: bytes, version: str) -> str | None: ...  # None: it is not ``version`` any more
    def delete(self, version: str) -> bool: ...


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class _LocalStore:
    """A local (or NFS) disk: an exclusive create, and every operation under an ``flock`` of the
    folder, so a compare and the write that follows it are one step to every other run."""

    how = "an exclusive create (O_CREAT | O_EXCL) and an flock of the output folder"

    def __init__(self, path: str):
        self.path = path
        os.makedirs(os.path.dirname(path), exist_ok=True)

    @contextlib.contextmanager
    def _locked(self, kind: int) -> Iterator[None]:
        fd = os.open(os.path.dirname(self.path), os.O_RDONLY)
        try:
            fcntl.flock(fd, kind)
            yield
        finally:
            os.close(fd)  # closing drops the lock

    def _read(self) -> tuple[bytes, str] | None:
        try:
            with open(self.path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return None
        return data, _digest(data)

    def _write(self, fd: int, data: bytes) -> str:
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, data, 0)
            os.fsync(fd)
        finally:
            os.close(fd)
        return _digest(data)

    def read(self) -> tuple[bytes, str] | None:
        with self._locked(fcntl.LOCK_SH):
            return self._read()

    def create(self, data: bytes) -> str | None:
        with self._locked(fcntl.LOCK_EX):
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                return None
            return self._write(fd, data)

    def replace(self, data: bytes, version: str) -> str | None:
        with self._locked(fcntl.LOCK_EX):
            current = self._read()
            if current is None or current[1] != version:
                return None
            return self._write(os.open(self.path, os.O_WRONLY), data)

    def delete(self, version: str) -> bool:
        with self._locked(fcntl.LOCK_EX):
            current = self._read()
            if current is None or current[1] != version:
                return False
            os.unlink(self.path)
            return True


# S3 error codes that mean "the condition did not hold" (or, for the probe, that it was checked).
# ConditionalRequestConflict (409) is AWS's answer to a conditional write racing another one.
_CONDITION_CODES = {"PreconditionFailed", "ConditionalRequestConflict", "NoSuchKey", "412", "409", "404"}


def _s3_code(exc: BaseException) -> str | None:
    """The S3 error code behind an s3fs exception (s3fs keeps botocore's error as the cause)."""
    seen: BaseException | None = exc
    while seen is not None:
        response = getattr(seen, "response", None)
        if isinstance(response, dict):
            return str(response.get("Error", {}).get("Code"))
        seen = seen.__cause__
    return None


def _condition_failed(exc: BaseException) -> bool:
    return isinstance(exc, FileExistsError) or _s3_code(exc) in _CONDITION_CODES


async def _get(fs: Any, bucket: str, key: str) -> tuple[bytes, str]:
    response = await fs._call_s3("get_object", Bucket=bucket, Key=key)
    async with response["Body"] as body:
        data = await body.read()
    return data, response["ETag"]


class _S3Store:
    """S3 with conditional writes: If-None-Match: * to create, If-Match: <ETag> to replace or delete."""

    how = "S3 conditional writes (If-None-Match: *, If-Match: <ETag>)"

    def __init__(self, fs: Any, path: str):
        self.fs = fs
        self.bucket, self.key, _ = fs.split_path(path)

    def _call(self, method: str, **kwargs: Any) -> dict:
        return self.fs.call_s3(method, Bucket=self.bucket, Key=self.key, **kwargs)

    def read(self) -> tuple[bytes, str] | None:
        try:
            return sync(self.fs.loop, _get, self.fs, self.bucket, self.key)
        except FileNotFoundError:
            return None

    def _put(self, data: bytes, **condition: str) -> str | None:
        try:
            return self._call("put_object", Body=data, **condition)["ETag"]
        except OSError as exc:
            if not _condition_failed(exc):
                raise
        # A retried request whose first try succeeded fails its own condition: it is ours if it reads back so
        current = self.read()
        return current[1] if current is not None and current[0] == data else None

    def create(self, data: bytes) -> str | None:
        return self._put(data, IfNoneMatch="*")

    def replace(self, data: bytes, version: str) -> str | None:
        return self._put(data, IfMatch=version)

    def delete(self, version: str) -> bool:
        try:
            self._call("delete_object", IfMatch=version)
        except OSError as exc:
            if not _condition_failed(exc):
                raise
            return False
        return True


class _VerifiedStore:
    """Any fsspec store, conditional writes or not: look, write, wait ``settle``, read it back. A racing
    writer whose write lands within ``settle`` of this one can still be missed."""

    how = "create-then-verify (this store ignores conditional writes)"

    def __init__(self, fs: Any, path: str, settle: float):
        self.fs, self.path, self.settle = fs, path, settle

    def read(self) -> tuple[bytes, str] | None:
        self.fs.invalidate_cache(self.path)
        try:
            data = self.fs.cat_file(self.path)
        except FileNotFoundError:
            return None
        return data, _digest(data)

    def _write_and_verify(self, data: bytes) -> str | None:
        self.fs.pipe_file(self.path, data)
        time.sleep(self.settle)
        current = self.read()
        return current[1] if current is not None and current[0] == data else None

    def create(self, data: bytes) -> str | None:
        return None if self.read() is not None else self._write_and_verify(data)

    def replace(self, data: bytes, version: str) -> str | None:
        current = self.read()
        return self._write_and_verify(data) if current is not None and current[1] == version else None

    def delete(self, version: str) -> bool:
        current = self.read()
        if current is None or current[1] != version:
            return False
        self.fs.rm(self.path)
        return True


_HONOURS: dict[tuple[str, str], bool] = {}  # (endpoint, bucket) -> whether it honours conditional writes


def honours_conditional_writes(fs: Any, path: str) -> bool:
    """Whether the S3 store behind ``fs`` refuses a write whose condition fails: a PutObject with
    ``If-Match`` on a key that does not exist must fail (404 NoSuchKey on AWS and moto, or 412).
    Where it succeeds, the store ignored the condition; the probe object it left is removed.
    Asked once per endpoint and bucket in a process."""
    bucket, key, _ = fs.split_path(path)
    endpoint = str(getattr(fs, "endpoint_url", None) or fs.client_kwargs.get("endpoint_url") or "aws")
    cached = _HONOURS.get((endpoint, bucket))
    if cached is not None:
        return cached
    probe = f"{key}.probe-{uuid.uuid4().hex[:12]}"
    try:
        fs.call_s3("put_object", Bucket=bucket, Key=probe, Body=b"", IfMatch='"ngt-ray-lease-probe"')
    except OSError as exc:
        if _s3_code(exc) not in _CONDITION_CODES:
            raise
        honours = True
    else:
        honours = False
        fs.call_s3("delete_object", Bucket=bucket, Key=probe)
    _HONOURS[(endpoint, bucket)] = honours
    return honours


def _store_for(lease: Location, settle: float) -> _Store:
    fs = lease.fs
    if "file" in fs.protocol:
        return _LocalStore(lease.path)
    if "s3" in fs.protocol and honours_conditional_writes(fs, lease.path):
        return _S3Store(fs, lease.path)
    store = _VerifiedStore(fs, lease.path, settle)
    log.warning("%s: this store ignores conditional writes, so the lease that keeps a second run out is "
                "taken by %s: two runs whose writes land within %.1f s of each other could both proceed",
                lease.url, store.how, settle)
    return store


class OutputLease:
    """This run's lease on one output. ``RunOutput.open`` takes it (``acquire``) before reading or
    writing anything there; ``with lease:`` releases it however the run ends, and turns the
    interruption a lost lease causes into ``LeaseLost``.

    ``wait``: where another live run holds it, wait (polling) until it is released or expires,
    instead of refusing. ``ttl``: seconds (default ``lease_ttl()``); ``settle``: the
    create-then-verify wait on stores without conditional writes."""

    def __init__(self, *, wait: bool = False, ttl: float | None = None, settle: float | None = None):
        self.wait = wait
        self.ttl = ttl if ttl is not None else lease_ttl()
        self.settle = settle if settle is not None else min(SETTLE_SECONDS, self.ttl / 10)
        self.poll = min(max(self.ttl / 4, 0.05), 5.0)
        self.holder: Holder | None = None  # while held: what this run last wrote
        self.url = ""
        self.lost: LeaseLost | None = None
        self._store: _Store | None = None
        self._version: str | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None
        self._interrupt = False
        self._id = (socket.gethostname(), os.getpid(), uuid.uuid4().hex[:12])

    @property
    def held(self) -> bool:
        return self._version is not None and self.lost is None

    def _mine(self, now: float) -> Holder:
        host, pid, run = self._id
        started = self.holder.started if self.holder else now
        return Holder(host, pid, run, started, now, now + self.ttl, self.ttl)

    def acquire(self, root: Location) -> OutputLease:
        """Take the lease on ``root`` (create it, or take over an expired one); raise ``LeaseError``
        naming the holder where a live run holds it (or wait, with ``wait``). Held already on
        ``root``: nothing to do."""
        if self._version is not None:
            if self.lost is not None:
                raise self.lost
            if self.url == root.url:
                return self
            raise ValueError(f"this lease is held on {self.url}, not {root.url}")
        self.url = root.url
        store = self._store = _store_for(root.join(LEASE), self.settle)
        waiting_for = None
        while True:
            current = store.read()
            now = time.time()
            mine = self._mine(now)
            if current is None:
                version = store.create(mine.to_json())
            else:
                holder = Holder.parse(current[0])
                if holder.expires > now:
                    if not self.wait:
                        raise LeaseError(f"{root.url} is being written by another run: {holder.describe(now)}; "
                                         "pass --wait-for-lease to run once it ends, or choose another --output")
                    if waiting_for != holder.run:
                        log.warning("%s is being written by another run: %s; waiting for its lease",
                                    root.url, holder.describe(now))
                        waiting_for = holder.run
                    time.sleep(self.poll)
                    continue
                log.warning("%s: taking over the expired lease of %s", root.url, holder.describe(now))
                version = store.replace(mine.to_json(), current[1])
            if version is not None:
                self.holder, self._version = mine, version
                break
            # another run created or took it between the read and the write: read again to see who
        log.info("%s: lease taken by %s (%s, ttl %.0f s)", root.url, self.holder.id, store.how, self.ttl)
        self._interrupt = threading.current_thread() is threading.main_thread()
        self._renewer = threading.Thread(target=self._renew_loop, name="ngt-ray-lease", daemon=True)
        self._renewer.start()
        return self

    def _lost(self, current: tuple[bytes, str] | None, why: str) -> LeaseLost:
        now = time.time()
        who = f"held now by {Holder.parse(current[0]).describe(now)}" if current else "removed"
        return LeaseLost(f"lost the lease on {self.url} ({why}; it is {who}): stopping rather than write "
                         "beside another run; run again to resume")

    def renew(self) -> None:
        """Move ``expires`` to now + ttl, over exactly what this run last wrote; raise ``LeaseLost``
        where that is no longer there. A store that cannot be reached raises its own error."""
        assert self._store is not None
        with self._lock:
            if self._version is None:
                return
            mine = self._mine(time.time())
            data = mine.to_json()
            version = self._store.replace(data, self._version)
            if version is None:
                current = self._store.read()
                if current is not None and current[1] == self._version:
                    return  # a conflicting write (S3's 409) left ours in place: the next tick renews
                raise self._lost(current, "another run took it over, or it was removed")
            self.holder, self._version = mine, version

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.ttl / 3):
            try:
                self.renew()
            except LeaseLost as exc:
                self._give_up(exc)
                return
            except Exception as exc:  # the store is unreachable: retried until this run's lease runs out
                assert self.holder is not None
                if time.time() < self.holder.expires:
                    log.warning("%s: could not renew the lease (%s); retrying", self.url, redact(str(exc)))
                    continue
                self._give_up(self._lost(None, f"it could not be renewed before it expired: {redact(str(exc))}"))
                return

    def _give_up(self, exc: LeaseLost) -> None:
        self.lost = exc
        log.error("%s", exc)
        if self._interrupt and not self._stop.is_set():  # the run's driver thread: stop it there (see __exit__)
            # a real SIGINT, as Ctrl-C: it also wakes a blocking call (interrupt_main would wait for it to return)
            signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)

    def check(self) -> None:
        """Raise ``LeaseLost`` unless the lease object is still the one this run last wrote: asked
        before a run presents its results."""
        if self.lost is not None:
            raise self.lost
        assert self._store is not None
        with self._lock:
            current = self._store.read()
            if current is None or current[1] != self._version:
                self.lost = self._lost(current, "found before presenting the results")
                raise self.lost

    def release(self) -> None:
        """Stop renewing and delete the lease, only while it is still this run's."""
        self._stop.set()
        if self._renewer is not None and self._renewer is not threading.current_thread():
            self._renewer.join(timeout=60)
        with self._lock:
            if self._version is None or self._store is None:
                return
            version, self._version = self._version, None
            try:
                if not self._store.delete(version):
                    log.warning("%s: the lease was no longer this run's at release; left as it is", self.url)
            except OSError as exc:  # it expires on its own
                log.warning("%s: could not release the lease (%s); it expires at %s", self.url,
                            redact(str(exc)), _iso(self.holder.expires) if self.holder else "?")

    def __enter__(self) -> OutputLease:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: Any) -> None:
        self.release()
        if self.lost is not None and kind is KeyboardInterrupt:  # the renewer interrupted the run
            raise self.lost from None
