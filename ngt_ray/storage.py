"""One way to reach any bucket: fsspec filesystems, handed to Ray Data and pyarrow as pyarrow ones.

``s3://`` goes through s3fs (credentials from the standard AWS chain; the endpoint from
``--s3-endpoint`` or ``AWS_ENDPOINT_URL``, so MinIO, Ceph, R2 or a local test server work the same
as AWS). Any other fsspec protocol (``gs://``, ``az://``, ``file://``, plain paths) works unchanged.

Also here, because they are about what storage hands the job: the largest object read into memory
(``MAX_OBJECT_BYTES``), the uri the flags table names an object by (``Location.object_uri``), and
``redact``, which keeps signed URLs out of anything echoed back to people.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

import fsspec
import pyarrow.fs as pafs
from fsspec.core import split_protocol, strip_protocol

from ngt_ray.errors import ErrorKind, RowError

__all__ = ["MAX_OBJECT_BYTES", "Location", "object_too_large", "redact", "require_bucket", "resolve"]

# The most bytes of one object read into memory. A photo is a few MiB (an 8000x6000 JPEG about 15);
# anything larger is refused with an error row, before it is read where the listing gives its size.
MAX_OBJECT_BYTES = 64 * 2**20

# In an object's uri these are percent-encoded: ``%`` (so escapes stay reversible), ``#`` (packed
# inputs name a sample as ``container#key``), ``?`` (a query string) and control characters.
_ESCAPED = re.compile(r"[%#?\x00-\x1f\x7f]")
_ESCAPE = re.compile(r"%([0-9A-Fa-f]{2})")
# A repr with a memory address (Pillow's "cannot identify image file <_io.BytesIO object at 0x7f...>")
_ADDRESS = re.compile(r"\s*<[^<>]*\bat 0x[0-9a-fA-F]+>")
# A URL's query string (a presigned URL's X-Amz-Signature, a SAS token) and credential-looking pairs
_QUERY = re.compile(r"(\b[a-z][a-z0-9+.-]*://[^\s?'\"<>]*)\?[^\s'\"<>]*", re.IGNORECASE)
# user:password@ in a URL
_USERINFO = re.compile(r"(\b[a-z][a-z0-9+.-]*://)[^/\s'\"@]+@", re.IGNORECASE)
_SECRET = re.compile(r"((?:signature|credential|security-token|secret[_-]?access[_-]?key|sig|token|password)=)"
                     r"[^&\s'\"<>),;]+", re.IGNORECASE)


def object_too_large(size: int | None) -> RowError | None:
    """The error for an object of ``size`` bytes over ``MAX_OBJECT_BYTES``; None when it fits."""
    if size is None or size <= MAX_OBJECT_BYTES:
        return None
    return RowError(ErrorKind.TOO_LARGE,
                    f"too large: object is {size / 2**20:.0f} MiB, over the {MAX_OBJECT_BYTES // 2**20} MiB limit")


def redact(text: str) -> str:
    """``text`` as people may read it: every URL's query string, user:password and any
    credential-looking ``key=value`` cut out (errors from storage clients can quote the request they made, presigned
    signature included), and reprs with a memory address, which say nothing to a reader, dropped."""
    text = _USERINFO.sub(r"\1", _ADDRESS.sub("", text))
    return _SECRET.sub(r"\1<redacted>", _QUERY.sub(r"\1?<query removed>", text))


def require_bucket(loc: Location, role: str, error: type[Exception], hint: str = "") -> None:
    """On an object store, the bucket of ``loc`` (its first path part) must already exist: raise
    ``error`` naming the ``role`` ("input", "output") otherwise, or when it cannot be reached."""
    if "file" in loc.fs.protocol:
        return
    bucket = loc.path.split("/", 1)[0]
    try:
        exists = loc.fs.exists(bucket)
    except OSError as exc:
        raise error(f"cannot reach the {role} bucket {bucket!r}: {redact(str(exc))}") from exc
    if not exists:
        raise error(f"{role} bucket {bucket!r} does not exist (or is not visible with these credentials){hint}")


@dataclass(frozen=True)
class Location:
    """A URL resolved to a filesystem and the protocol-less path that filesystem expects."""

    url: str
    fs: fsspec.AbstractFileSystem
    path: str

    @property
    def arrow_fs(self) -> pafs.FileSystem:
        """The same filesystem for Ray Data and pyarrow readers and writers (pyarrow's own for local
        paths, which skips a Python call per read and write)."""
        if "file" in self.fs.protocol:
            return pafs.LocalFileSystem()
        return pafs.PyFileSystem(pafs.FSSpecHandler(self.fs))

    def join(self, *parts: str) -> Location:
        path = "/".join([self.path.rstrip("/"), *parts])
        return Location(self.fs.unstrip_protocol(path), self.fs, path)

    def uri(self, path: str) -> str:
        """A full URL for a path inside this filesystem, as the filesystem spells it (to open it again)."""
        return self.fs.unstrip_protocol(path)

    def object_uri(self, path: str) -> str:
        """The uri the flags table names the object at ``path`` by: ``uri`` with ``%``, ``#``, ``?`` and
        control characters percent-encoded, so ``hash#frag.jpg`` never reads as a packed input's
        ``container#key`` and every uri splits at its first ``#``. A function of the path alone (a
        resumed run matches its earlier rows by it); ``object_path`` inverts it."""
        return self.fs.unstrip_protocol(_ESCAPED.sub(lambda m: f"%{ord(m.group()):02X}", path))

    def object_path(self, uri: str) -> str:
        """The path of the object an ``object_uri`` names (a packed input's ``#key`` left off)."""
        return _ESCAPE.sub(lambda m: chr(int(m.group(1), 16)), self.fs._strip_protocol(uri.split("#", 1)[0]))


def resolve(url: str, s3_endpoint: str | None = None) -> Location:
    """Resolve ``url`` (any fsspec URL or a local path) to a :class:`Location`."""
    protocol, _ = split_protocol(url)
    protocol = protocol or "file"
    options: dict = {}
    if protocol in ("s3", "s3a"):
        endpoint = s3_endpoint or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        if endpoint:
            options["endpoint_url"] = endpoint
            # S3-compatible stores often answer ranged reads with the whole object's checksum,
            # which botocore's default flexible-checksum validation rejects.
            options["config_kwargs"] = {
                "request_checksum_calculation": "when_required",
                "response_checksum_validation": "when_required",
            }
        protocol = "s3"
    if protocol == "file":
        url = os.path.abspath(strip_protocol(url))
    # A fresh instance: fsspec's instance cache would keep a client with stale credentials.
    fs = fsspec.filesystem(protocol, skip_instance_cache=True, **options)
    path = fs._strip_protocol(url)
    return Location(url, fs, path)
