"""One way to reach any bucket: fsspec filesystems, handed to Ray Data and pyarrow as pyarrow ones.

``s3://`` goes through s3fs (credentials from the standard AWS chain; the endpoint from
``--s3-endpoint`` or ``AWS_ENDPOINT_URL``, so MinIO, Ceph, R2 or a local test server work the same
as AWS). Any other fsspec protocol (``gs://``, ``az://``, ``file://``, plain paths) works unchanged.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import fsspec
import pyarrow.fs as pafs
from fsspec.core import split_protocol, strip_protocol

__all__ = ["Location", "resolve"]


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
        """A full URL for a path inside this filesystem (what the flags table reports)."""
        return self.fs.unstrip_protocol(path)


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
