"""Reading whole objects with one layer of retries, counted, and errors that keep their kind.

Why not the filesystem's own retries: on S3, botocore retries inside s3fs's retries (one SlowDown
object took 25 GETs and 39 s; a reset 10 GETs), nobody can count them, and a truncated body, a
reset and a refused connection all end as differently-shaped exceptions. Here the S3 client makes
one attempt per read, and ``fetch`` owns the loop:

* every object is read concurrently in one call (``cat_ranges``: no glob expansion of keys, no
  HEAD before each GET), then the transient failures are read again, together, after a backoff
  with jitter; at most ``RetryPolicy.attempts`` attempts, so a batch waits seconds, not minutes;
* transient: throttling (SlowDown, 503, 429), other 5xx, resets, timeouts, truncated bodies (the
  client checks Content-Length; against listed sizes too, where the caller has them);
* an object that still fails, or fails for good (NoSuchKey, AccessDenied on that object, not a
  regular file), is a :class:`FetchError`: its row says "read failed after N attempts: <reason>";
* a bucket that cannot be read (no such bucket, bad credentials, every object denied) or a store
  that cannot be reached or fails every read of a batch raises :class:`StorageError`: the run stops
  rather than record readable objects as failed, and the same command resumes it (a written error
  row is final: a resumed run skips it).

Messages name the object and the cause, with no memory addresses, query strings or credentials.

The same loop reads byte ranges (``fetch(..., ranges=...)``: a container too large to hold whole is
read piece by piece, every piece retried), and writes whole objects (``put``; ``retrying_writes``
hands it to pyarrow and Ray Data writers): a write is one PUT, retried on the same transient
failures; on a local disk it goes to a temporary name first, so a file is complete or absent.
"""

from __future__ import annotations

import http.client
import io
import logging
import os
import random
import re
import time
import types
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import aiohttp
import fsspec
import pyarrow as pa
import pyarrow.fs as pafs
from fsspec.exceptions import FSTimeoutError

try:
    import botocore.exceptions as boto
    from botocore.parsers import ResponseParserError
except ModuleNotFoundError:  # an image without S3 support (the GPU check's): local reads raise no botocore error

    class _NeverRaised(Exception):
        """Stands in for botocore's exception types where botocore is not installed."""

    boto = types.SimpleNamespace(**dict.fromkeys(
        ("BotoCoreError", "ClientError", "ConnectTimeoutError", "ReadTimeoutError", "IncompleteReadError",
         "ResponseStreamingError", "ConnectionClosedError", "EndpointConnectionError", "HTTPClientError"),
        _NeverRaised))
    ResponseParserError = _NeverRaised

from ngt_ray.storage import redact

__all__ = ["BucketError", "FetchError", "Fetched", "RetryPolicy", "StorageError", "StorageUnavailable", "classify",
           "fetch", "put", "retrying_writes", "single_attempt_client"]

log = logging.getLogger(__name__)

# What a failed read is: retried (TRANSIENT, UNREACHABLE) or not (OBJECT, BUCKET).
TRANSIENT, UNREACHABLE, OBJECT, BUCKET = "transient", "unreachable", "object", "bucket"

# S3 error codes that concern the bucket or the credentials, never one object.
_BUCKET_CODES = {"NoSuchBucket", "InvalidBucketName", "InvalidAccessKeyId", "SignatureDoesNotMatch",
                 "AllAccessDisabled", "AccountProblem", "InvalidToken", "ExpiredToken", "TokenRefreshRequired"}
_TRANSIENT_CODES = {"SlowDown", "Throttling", "ThrottlingException", "RequestLimitExceeded", "TooManyRequests",
                    "RequestTimeout", "RequestTimeTooSkewed", "ServiceUnavailable", "InternalError",
                    "XAmzContentSHA256Mismatch", "BadDigest"}


class StorageError(RuntimeError):
    """The run cannot go on reading this input (raised from a read task; the run stops)."""


class BucketError(StorageError):
    """The bucket itself refuses: no such bucket, bad credentials, every object of a batch denied."""


class StorageUnavailable(StorageError):
    """The store cannot be reached, or failed every read of a batch after every attempt."""


class TruncatedBody(OSError):
    """Fewer (or more) bytes arrived than the object's listed size."""


@dataclass(frozen=True)
class RetryPolicy:
    """Attempts per object, and the backoff between rounds: ``base * 2**(round - 1)``, at most ``cap``,
    of which a random half (equal jitter: readers that failed together do not retry together).
    The defaults wait 7.5 s at most over 5 attempts (at least half that)."""

    attempts: int = 5
    base: float = 0.5
    cap: float = 8.0

    def backoff(self, round_: int, rng: random.Random) -> float:
        step = min(self.cap, self.base * 2 ** (round_ - 1))
        return step / 2 + rng.uniform(0, step / 2)


@dataclass(frozen=True)
class FetchError:
    """Why one object could not be read; ``str()`` is its row's error."""

    uri: str
    kind: str  # TRANSIENT or UNREACHABLE (gave up after every attempt), OBJECT or BUCKET (not retried)
    code: str  # the S3 error code, or what happened: ConnectionReset, ReadTimeout, TruncatedBody, ...
    reason: str
    attempts: int

    def __str__(self) -> str:
        return f"read failed after {self.attempts} attempt{'s' if self.attempts > 1 else ''}: {self.reason}"


@dataclass(frozen=True)
class Fetched:
    """Per object, in the order asked: its bytes or its :class:`FetchError`, and the attempts it took."""

    results: list[bytes | FetchError]
    attempts: list[int]
    seconds: float

    @property
    def retries(self) -> int:
        return sum(self.attempts) - len(self.attempts)

    @property
    def errors(self) -> list[FetchError]:
        return [r for r in self.results if isinstance(r, FetchError)]


def single_attempt_client(fs: fsspec.AbstractFileSystem) -> fsspec.AbstractFileSystem:
    """The same filesystem making one attempt per read (S3: no botocore or s3fs retries, and no HEAD
    before each GET, which s3fs sends to decide on a chunked read); other filesystems as they are.

    A new S3 client costs a session and its connections: a caller making many small reads or writes
    (the report's thumbnails) makes one client here and passes it on; it is used as it is."""
    if getattr(fs, "single_attempt", False):
        return fs
    protocols = {fs.protocol} if isinstance(fs.protocol, str) else set(fs.protocol)
    if not protocols & {"s3", "s3a"}:  # not S3: s3fs need not even be installed
        return fs
    import s3fs

    if not isinstance(fs, s3fs.S3FileSystem):
        return fs
    options = dict(fs.storage_options)
    config = {**options.get("config_kwargs", {}), "retries": {"total_max_attempts": 1, "mode": "standard"}}
    client = type(fs)(**{**options, "config_kwargs": config, "max_concurrency": 1}, skip_instance_cache=True)
    client.retries = 1  # s3fs's own loop around each call
    client.single_attempt = True
    return client


def exception_chain(exc: BaseException) -> list[BaseException]:
    """``exc`` and what it wraps (its cause, else its context), each once."""
    out: list[BaseException] = []
    while exc is not None and exc not in out:
        out.append(exc)
        exc = exc.__cause__ or exc.__context__
    return out




def clean(message: str, limit: int = 300) -> str:
    """A message fit for a row or a log: ``redact``ed (no memory address, query string, password or
    credential), one line, at most ``limit`` characters."""
    message = " ".join(redact(message).split())
    return message if len(message) <= limit else message[: limit - 1] + "…"


def _endpoint(chain: list[BaseException]) -> str:
    for e in chain:
        url = getattr(e, "kwargs", {}).get("endpoint_url") if isinstance(e, boto.BotoCoreError) else None
        if url:
            return clean(url.split("://", 1)[-1].split("/", 1)[0])
    return "the endpoint"


def classify(exc: BaseException) -> tuple[str, str, str]:
    """``(kind, code, reason)`` of a failed read, from the exception and what it wraps (s3fs turns S3
    errors into OSErrors that keep botocore's ClientError as their cause; botocore wraps aiohttp's)."""
    chain = exception_chain(exc)

    def has(*types: type) -> bool:
        return any(isinstance(e, types) for e in chain)

    for e in chain:
        if isinstance(e, boto.ClientError):
            error, meta = e.response.get("Error", {}), e.response.get("ResponseMetadata", {})
            code, status = str(error.get("Code") or "error"), int(meta.get("HTTPStatusCode") or 0)
            reason = clean(f"{code} (HTTP {status}): {error.get('Message') or ''}".rstrip(": "))
            if code in _BUCKET_CODES:
                return BUCKET, code, reason
            if code in _TRANSIENT_CODES or status >= 500 or status == 429:
                return TRANSIENT, code, reason
            return OBJECT, code, reason
    if has(aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError, boto.ConnectTimeoutError,
           ConnectionRefusedError):
        return UNREACHABLE, "Unreachable", f"cannot connect to {_endpoint(chain)}"
    if has(boto.ReadTimeoutError, aiohttp.ServerTimeoutError, FSTimeoutError, TimeoutError):
        return TRANSIENT, "ReadTimeout", "read timed out"
    if has(TruncatedBody, aiohttp.ClientPayloadError, boto.IncompleteReadError, boto.ResponseStreamingError,
           http.client.IncompleteRead):
        got = re.search(r"(\d+)(?: read, but total bytes expected is | of )(\d+)", " ".join(map(str, chain)))
        return TRANSIENT, "TruncatedBody", "truncated body" + (f" ({got[1]} of {got[2]} bytes)" if got else "")
    if has(ConnectionError, aiohttp.ServerDisconnectedError, aiohttp.ClientOSError, boto.ConnectionClosedError,
           boto.EndpointConnectionError, boto.HTTPClientError, ResponseParserError):
        return TRANSIENT, "ConnectionReset", "connection reset or closed by the server"
    if isinstance(exc, FileNotFoundError):
        return OBJECT, "NotFound", "no such object (deleted since it was listed, or a dangling link)"
    if isinstance(exc, IsADirectoryError | NotADirectoryError):
        return OBJECT, "NotAFile", "not a regular file"
    if isinstance(exc, PermissionError):
        return OBJECT, "PermissionDenied", clean(f"permission denied: {exc}")
    return OBJECT, type(exc).__name__, clean(f"{type(exc).__name__}: {exc}")


def fetch(fs: fsspec.AbstractFileSystem, paths: Sequence[str], *, sizes: Sequence[int | None] | None = None,
          ranges: Sequence[tuple[int, int]] | None = None, policy: RetryPolicy = RetryPolicy(),
          sleep: Callable[[float], None] = time.sleep, rng: random.Random | None = None) -> Fetched:
    """Every object of ``paths`` (protocol-less, as ``fs`` names them), whole; see the module's rules.

    ``sizes``: the objects' listed sizes, where known: a read of another length is a truncated body.
    ``ranges``: ``(start, end)`` per path, to read those bytes only; each range must lie within its
    object, so a read of another length than ``end - start`` is a truncated body.
    Raises :class:`BucketError` or :class:`StorageUnavailable` when the bucket or the store, not an
    object, is at fault.
    """
    if not paths:
        return Fetched([], [], 0.0)
    if ranges is not None:
        sizes = [end - start for start, end in ranges]
    client, rng = single_attempt_client(fs), rng or random.Random()
    start, n = time.perf_counter(), len(paths)
    results: list[bytes | FetchError | None] = [None] * n
    attempts = [0] * n
    failed: dict[int, tuple[str, str, str]] = {}
    todo = list(range(n))
    for round_ in range(policy.attempts):
        if round_:
            sleep(policy.backoff(round_, rng))
        starts, ends = ([ranges[i][0] for i in todo], [ranges[i][1] for i in todo]) if ranges else (None, None)
        got = client.cat_ranges([paths[i] for i in todo], starts, ends, on_error="return")
        retry = []
        for i, value in zip(todo, got):
            attempts[i] += 1
            if isinstance(value, bytes) and sizes is not None and sizes[i] is not None and len(value) != sizes[i]:
                value = TruncatedBody(f"{len(value)} of {sizes[i]} bytes")
            if isinstance(value, bytes):
                results[i] = value
                failed.pop(i, None)
                continue
            failed[i] = classify(value)
            if failed[i][0] in (TRANSIENT, UNREACHABLE):
                retry.append(i)
        if round_ == 0:
            _stop_if_bucket_refuses(fs, paths, failed)
        todo = retry
        if not todo:
            break
    for i, (kind, code, reason) in failed.items():
        results[i] = FetchError(fs.unstrip_protocol(paths[i]), kind, code, reason, attempts[i])
    fetched = Fetched(results, attempts, time.perf_counter() - start)  # type: ignore[arg-type]
    _stop_if_store_fails(fetched, client, paths)
    if failed or fetched.retries:
        log.warning("read %d objects in %.1f s: %d retries, %d failed%s", n, fetched.seconds, fetched.retries,
                    len(failed), "".join(f"; {e.uri}: {e}" for e in fetched.errors[:3]))
    return fetched


def _stop_if_bucket_refuses(fs: fsspec.AbstractFileSystem, paths: Sequence[str],
                            failed: dict[int, tuple[str, str, str]]) -> None:
    """After the first round: a bucket-level code on any object, or AccessDenied on every object of a
    batch of two or more, is the bucket's (or the credentials') doing, not the objects'."""
    bucket = [i for i, (kind, *_) in failed.items() if kind == BUCKET]
    denied = [i for i, (_, code, _) in failed.items() if code == "AccessDenied"]
    which = bucket or (denied if len(denied) == len(paths) > 1 else [])
    if which:
        _, code, reason = failed[which[0]]
        raise BucketError(f"cannot read the input: {reason} (reading {fs.unstrip_protocol(paths[which[0]])}; "
                          f"{len(which)} of {len(paths)} objects of a batch got {code}). The run stops: check the "
                          "bucket name, the credentials the workers get and the bucket's policy.")


def _stop_if_store_fails(fetched: Fetched, client: fsspec.AbstractFileSystem, paths: Sequence[str]) -> None:
    """A store that cannot be reached, or that failed every read of a batch of two or more after every
    attempt, is down: stop, so the objects stay unread (the same command resumes) rather than failed.
    One object read alone (a WebDataset shard, a Parquet file, a piece of either) that fails after
    every attempt says nothing about the store by itself: the store is asked about that object
    once more (a HEAD, one attempt), and only if that fails too is the store taken for down."""
    errors = fetched.errors
    unreachable = [e for e in errors if e.kind == UNREACHABLE]
    all_failed = len(errors) == len(fetched.results) > 1 and all(e.kind == TRANSIENT for e in errors)
    if len(fetched.results) == 1 and errors and errors[0].kind == TRANSIENT and not _answers(client, paths[0]):
        all_failed = True
    if unreachable or all_failed:
        e = (unreachable or errors)[0]
        raise StorageUnavailable(
            f"the object store is unavailable: {e.reason} (reading {e.uri}; {len(errors)} of "
            f"{len(fetched.results)} objects of a batch failed, after up to {max(fetched.attempts)} attempts over "
            f"{fetched.seconds:.0f} s). The run stops; the same command resumes it and reads only what is missing.")


def _answers(client: fsspec.AbstractFileSystem, path: str) -> bool:
    """Whether the store answers a question about ``path`` (its size: a HEAD on S3) in one attempt."""
    try:
        client.info(path)
    except Exception as exc:  # noqa: BLE001 - classified: only a failure of the store's counts
        return classify(exc)[0] not in (TRANSIENT, UNREACHABLE)
    return True


def _is_local(fs: fsspec.AbstractFileSystem) -> bool:
    return "file" in ((fs.protocol,) if isinstance(fs.protocol, str) else fs.protocol)


def put(fs: fsspec.AbstractFileSystem, path: str, data: bytes, *, policy: RetryPolicy = RetryPolicy(),
        sleep: Callable[[float], None] = time.sleep, rng: random.Random | None = None) -> int:
    """Write ``data`` as the object ``path`` (protocol-less), whole, in one request per attempt, and
    return the attempts it took.

    Transient failures (the kinds ``fetch`` retries) are retried with the same backoff; a PUT that is
    retried after the store took it writes the same bytes again, so a retry never leaves two objects.
    On a local disk the bytes go to a hidden temporary name beside ``path``, renamed over it once
    complete (a kill leaves no half file under the real name); on an object store one PUT is atomic.
    Raises :class:`BucketError` (bucket or credentials), :class:`StorageUnavailable` (still failing
    after every attempt) or :class:`StorageError` (refused for this object): a run cannot go on
    without its output, and the same command resumes it.
    """
    client, rng = single_attempt_client(fs), rng or random.Random()
    start, uri = time.perf_counter(), fs.unstrip_protocol(path)
    for attempt in range(1, policy.attempts + 1):
        if attempt > 1:
            sleep(policy.backoff(attempt - 1, rng))
        try:
            _put_once(client, path, data)
        except Exception as exc:  # noqa: BLE001 - classified below; unknown kinds are not retried
            kind, code, reason = classify(exc)
            if kind in (TRANSIENT, UNREACHABLE) and attempt < policy.attempts:
                continue
            seconds = time.perf_counter() - start
            if kind == BUCKET:
                raise BucketError(f"cannot write the output: {reason} (writing {uri}). The run stops: check the "
                                  "bucket name, the credentials the workers get and the bucket's policy.") from exc
            if kind in (TRANSIENT, UNREACHABLE):
                raise StorageUnavailable(
                    f"the object store is unavailable: {reason} (writing {uri}, after {attempt} attempts over "
                    f"{seconds:.0f} s). The run stops; the same command resumes it and writes only what is "
                    "missing.") from exc
            raise StorageError(f"cannot write {uri}: {reason}. The run stops.") from exc
        if attempt > 1:
            log.warning("wrote %s in %.1f s: %d retries", uri, time.perf_counter() - start, attempt - 1)
        return attempt
    raise AssertionError("unreachable")


def _put_once(client: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    if not _is_local(client):
        client.pipe_file(path, data)
        return
    folder, name = os.path.split(path)
    temporary = os.path.join(folder, f".{name}.{uuid.uuid4().hex[:12]}.tmp")  # hidden: no reader lists it
    try:
        with open(temporary, "wb") as f:
            f.write(data)
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


class _PutOnClose(io.BytesIO):
    """An output stream that holds what is written and ``put``s it, whole, when closed."""

    def __init__(self, fs: fsspec.AbstractFileSystem, path: str, policy: RetryPolicy) -> None:
        super().__init__()
        self._target = (fs, path, policy)

    def close(self) -> None:
        if self.closed:
            return
        fs, path, policy = self._target
        try:
            put(fs, path, self.getvalue(), policy=policy)
        finally:
            super().close()


class RetryingWrites(pafs.FSSpecHandler):
    """``FSSpecHandler`` whose output streams are written by ``put``: pyarrow and Ray Data writers
    (``write_parquet``, ``pq.write_table``) get counted retries, and a file complete or absent. Every
    other call (listing, reading) is FSSpecHandler's."""

    def __init__(self, fs: fsspec.AbstractFileSystem, policy: RetryPolicy = RetryPolicy()) -> None:
        super().__init__(fs)
        self.policy = policy

    def open_output_stream(self, path: str, metadata: dict | None = None) -> pa.NativeFile:
        return pa.PythonFile(_PutOnClose(self.fs, path, self.policy), mode="w")

    def open_append_stream(self, path: str, metadata: dict | None = None) -> pa.NativeFile:
        raise NotImplementedError("appending is not retried: write whole objects")


def retrying_writes(fs: fsspec.AbstractFileSystem, policy: RetryPolicy = RetryPolicy()) -> pafs.FileSystem:
    """``fs`` as a pyarrow filesystem for writers whose files must arrive whole despite a flaky store
    (see ``RetryingWrites``); local disks included, for the write-then-rename."""
    return pafs.PyFileSystem(RetryingWrites(fs, policy))
