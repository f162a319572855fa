"""An S3 reverse proxy on loopback that injects storage faults, so the tests see what a flaky store does.

It sits in front of the test S3 server (``rclone serve s3``): the job's client talks to the proxy as its
endpoint, and the proxy forwards every request with its Host header unchanged, so SigV4 signatures (which
cover the host the client signed for) still verify upstream. Faults hit requests to objects (with a key),
by default GETs only; listings always pass through, so a test knows which requests can fail.

Which GET fails is decided by a hash of (seed, key, attempt number of that key), not by arrival order: the
same seed fails the same attempts of the same objects however the reads interleave. Everything injected is
counted, per fault and per key.

Writes and HEADs fail only where ``methods`` names them (the default is GETs alone). Since a writer may
name its objects at random (Ray Data's files carry a fresh uuid), which PUT (or HEAD) fails is a hash of
(seed, method, its number among that method's requests): a seed fails the same share of them, in the order
they arrive. On a write, ``slowdown``, ``internal`` and ``reset`` answer before the store sees the object;
``truncate`` does nothing (an S3 write's answer has no body).

Faults: ``slowdown`` (503 SlowDown, S3's XML body), ``internal`` (500 InternalError), ``reset`` (the socket
is closed with a TCP RST, no response), ``truncate`` (the full Content-Length, half the body, then the
connection closes), ``delay`` (``delay_s`` of silence, then the object); and, for named keys only,
``nosuchkey`` (404), ``accessdenied`` (403) and ``nosuchbucket`` (404). ``stop()`` closes the listener
(new connections are refused) and resets every kept-alive connection at its next request; ``start()``
opens the same port again.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import re
import socket
import struct
import threading
import time
from collections import Counter
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

__all__ = ["FAULTS", "FaultProxy"]

FAULTS = ("slowdown", "internal", "reset", "truncate", "delay")
_ERRORS = {  # fault -> (status, S3 error code, message)
    "slowdown": (503, "SlowDown", "Please reduce your request rate."),
    "internal": (500, "InternalError", "We encountered an internal error. Please try again."),
    "nosuchkey": (404, "NoSuchKey", "The specified key does not exist."),
    "accessdenied": (403, "AccessDenied", "Access Denied"),
    "nosuchbucket": (404, "NoSuchBucket", "The specified bucket does not exist"),
}
_HOP_BY_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailers",
               "transfer-encoding", "upgrade", "content-length"}


class FaultProxy:
    """``with FaultProxy(upstream, fault="slowdown", rate=0.05) as proxy:`` then use ``proxy.endpoint``.

    ``always``: key (``bucket/key``) -> fault injected on every GET of that key, whatever ``rate``.
    ``down_after``: after this many object GETs the proxy stops itself (a store that dies mid-run).
    ``methods``: the requests to objects that faults hit (``("PUT",)``: the writes alone).
    ``only``: where given, faults hit only the keys it accepts (others pass, and take no number).
    """

    def __init__(self, upstream: str, fault: str | None = None, rate: float = 0.0, *, seed: int = 0,
                 always: dict[str, str] | None = None, delay_s: float = 2.0, down_after: int | None = None,
                 methods: tuple[str, ...] = ("GET",), only: Callable[[str], bool] | None = None):
        if fault is not None and fault not in FAULTS:
            raise ValueError(f"fault must be one of {FAULTS}, got {fault!r}")
        parts = urlsplit(upstream)
        self.upstream = (parts.hostname or "127.0.0.1", parts.port or 80)
        self.fault, self.rate, self.seed, self.delay_s = fault, rate, seed, delay_s
        self.always = dict(always or {})
        self.down_after = down_after
        self.methods = frozenset(methods)
        self.only = only
        self.injected: Counter[str] = Counter()  # fault -> times injected
        self.attempts: Counter[str] = Counter()  # bucket/key -> object GETs seen
        self.puts: Counter[str] = Counter()  # bucket/key -> PUTs seen
        # method -> requests to objects that botocore sent as its own retry (amz-sdk-request: attempt=2 or
        # more): zero where every retry is the fetch layer's, which has botocore make one attempt per call
        self.client_retries: Counter[str] = Counter()
        self._sequence: Counter[str] = Counter()  # method (not GET) -> requests to objects seen
        self.requests: Counter[str] = Counter()  # method -> requests seen
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._down = threading.Event()
        self.port = 0

    # -- lifecycle ---------------------------------------------------------------------------------

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def object_gets(self) -> int:
        return sum(self.attempts.values())

    def start(self) -> FaultProxy:
        """Listen (on the port used before, if any), forwarding in a daemon thread."""
        self._down.clear()
        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), _handler_for(self))
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.1},
                                        name=f"faultproxy-{self.port}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Refuse new connections and reset kept-alive ones at their next request."""
        self._down.set()
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- decisions ---------------------------------------------------------------------------------

    def _decide(self, key: str, method: str = "GET") -> str | None:
        """The fault for this request to the object ``key`` (None: forward it as it is), counted."""
        with self._lock:
            if method == "GET":
                n = self.attempts[key]
                self.attempts[key] += 1
                which = f"{key}:{n}"
            else:
                if method == "PUT":
                    self.puts[key] += 1
                which = f"{method}:{self._sequence[method]}"
                if self.only is None or self.only(key):
                    self._sequence[method] += 1
            if method == "GET" and self.down_after is not None and self.object_gets > self.down_after:
                fault = "down"
            elif method not in self.methods or (self.only is not None and not self.only(key)):
                fault = None
            elif key in self.always:
                fault = self.always[key]
            elif self.fault and self.rate > 0:
                digest = hashlib.sha256(f"{self.seed}:{which}".encode()).digest()
                fault = self.fault if struct.unpack(">Q", digest[:8])[0] / 2**64 < self.rate else None
            else:
                fault = None
            if fault and fault != "down":
                self.injected[fault] += 1
        if fault == "down" and not self._down.is_set():
            self._down.set()
            threading.Thread(target=self.stop, daemon=True).start()
        return fault

    def summary(self) -> str:
        return (f"{self.object_gets} object GETs, injected {dict(self.injected) or 'nothing'}, "
                f"requests {dict(self.requests)}")


def _object_key(path: str) -> str | None:
    """``bucket/key`` of a path-style object request; None for the service or a bucket (a listing)."""
    bucket, _, key = unquote(urlsplit(path).path).lstrip("/").partition("/")
    return f"{bucket}/{key}" if bucket and key else None


def _handler_for(proxy: FaultProxy) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as S3 clients expect
        upstream: http.client.HTTPConnection | None = None

        def log_message(self, format, *args) -> None:  # quiet: pytest shows failures, not traffic
            pass

        def do_any(self) -> None:
            with proxy._lock:
                proxy.requests[self.command] += 1
            if proxy._down.is_set():
                return self._reset()
            body = self._request_body()
            key = _object_key(self.path)
            attempt = re.search(r"attempt=(\d+)", self.headers.get("amz-sdk-request", ""))
            if key and attempt and int(attempt[1]) > 1:
                with proxy._lock:
                    proxy.client_retries[self.command] += 1
            fault = proxy._decide(key, self.command) if key else None
            if fault in ("reset", "down"):
                return self._reset()
            if fault in _ERRORS:
                return self._s3_error(*_ERRORS[fault], resource=self.path)
            if fault == "delay":
                time.sleep(proxy.delay_s)
            status, reason, headers, data = self._forward(body)
            if fault == "truncate" and len(data) > 1:
                return self._send(status, reason, headers, data, cut=len(data) // 2)
            self._send(status, reason, headers, data)

        do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = do_any

        def _request_body(self) -> bytes | None:
            if self.headers.get("Transfer-Encoding"):
                self.send_error(501, "the fault proxy forwards Content-Length bodies only")
                raise ConnectionAbortedError
            n = int(self.headers.get("Content-Length") or 0)
            return self.rfile.read(n) if n else None

        def _forward(self, body: bytes | None) -> tuple[int, str, list[tuple[str, str]], bytes]:
            """The upstream's answer to this request, sent with the client's headers (Host included)."""
            headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
            if body is not None:
                headers["Content-Length"] = str(len(body))
            for attempt in (1, 2):  # a kept-alive upstream connection may have been closed by the server
                if self.upstream is None:
                    self.upstream = http.client.HTTPConnection(*proxy.upstream, timeout=60)
                try:
                    self.upstream.request(self.command, self.path, body=body, headers=headers)
                    resp = self.upstream.getresponse()
                    data = b"" if self.command == "HEAD" else resp.read()
                    out = [(k, v) for k, v in resp.getheaders() if k.lower() not in _HOP_BY_HOP]
                    if self.command == "HEAD" and resp.getheader("Content-Length") is not None:
                        out.append(("Content-Length", resp.getheader("Content-Length")))
                    return resp.status, resp.reason, out, data
                except (http.client.HTTPException, OSError):
                    self.upstream.close()
                    self.upstream = None
                    if attempt == 2:
                        raise
            raise AssertionError("unreachable")

        def _send(self, status: int, reason: str, headers: list[tuple[str, str]], data: bytes,
                  cut: int | None = None) -> None:
            self.send_response_only(status, reason)
            for k, v in headers:
                self.send_header(k, v)
            if self.command != "HEAD":
                self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if self.command == "HEAD":
                return
            self.wfile.write(data if cut is None else data[:cut])
            self.wfile.flush()
            if cut is not None:  # the rest never comes: a clean close before Content-Length bytes
                self.close_connection = True
                with contextlib.suppress(OSError):
                    self.connection.shutdown(socket.SHUT_RDWR)

        def _s3_error(self, status: int, code: str, message: str, resource: str) -> None:
            body = (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code><Message>{message}'
                    f"</Message><Resource>{urlsplit(resource).path}</Resource><RequestId>faultproxy</RequestId>"
                    "</Error>").encode()
            self._send(status, http.client.responses.get(status, ""), [("Content-Type", "application/xml")], body)

        def _reset(self) -> None:
            """Close with a TCP RST and no response: what a crashed server or a dropped connection looks like."""
            self.close_connection = True
            with contextlib.suppress(OSError):
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                self.connection.close()

        def handle_one_request(self) -> None:
            try:
                super().handle_one_request()
            except ConnectionAbortedError:
                self.close_connection = True
            except OSError:  # the client went away mid-request
                self.close_connection = True

        def finish(self) -> None:
            with contextlib.suppress(OSError):
                super().finish()
            if self.upstream is not None:
                self.upstream.close()

    return Handler
