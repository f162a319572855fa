"""The head's dashboard, which serves the Jobs API, reached with the cluster's auth token.

Ray 2.60 turns token auth on for a cluster whose head finds a token (``ray start --head`` reads
``~/.ray/auth_token``; a local ``ray.init`` writes one): every request then needs
``Authorization: Bearer <token>``, and a node joins only with ``RAY_AUTH_MODE=token`` and the same
token. Ray's client sends the token only from a process that runs with ``RAY_AUTH_MODE=token``;
``connect`` sends it wherever it finds one, looking where Ray looks (``$RAY_AUTH_TOKEN``, the file
named by ``$RAY_AUTH_TOKEN_PATH``, ``~/.ray/auth_token``), so the token is the one thing to set. A
cluster without auth ignores the header.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple
from urllib.parse import urlsplit

from ngt_ray.options import option

if TYPE_CHECKING:
    from ray.job_submission import JobSubmissionClient

__all__ = ["ClusterError", "OnDashboard", "Token", "auth_token", "connect", "dashboard_address"]

# Ray's job CLI reads the first; the second is what most users already set
_ADDRESS_VARIABLES = ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS")
# a closed port fails at once; this bounds a host that drops packets (a wrong IP, a firewall)
_CONNECT_TIMEOUT_S = 10.0
_GET_TOKEN = "`ray get-auth-token` on the head prints it"


class ClusterError(Exception):
    """The cluster could not be reached, refused us, or cannot take the job; the message says what to do."""


@dataclass(frozen=True, kw_only=True)
class OnDashboard:
    """Options of the commands that talk to a cluster's Jobs API."""

    address: str | None = option(None, "the cluster's dashboard, http://<head>:8265 "
                                       "(default: $RAY_API_SERVER_ADDRESS or $RAY_ADDRESS)")


class Token(NamedTuple):
    value: str
    source: str  # where it was found, for the message when the cluster refuses it


def dashboard_address(address: str | None) -> str:
    """The dashboard's URL: ``address``, else the environment's; ``http://`` when no scheme is given."""
    address = address or next((os.environ[v] for v in _ADDRESS_VARIABLES if os.environ.get(v)), None)
    if not address:
        raise ClusterError("no cluster address: pass --address http://<head>:8265 or set RAY_ADDRESS to it")
    if address.startswith("ray://"):
        raise ClusterError(f"{address} is a Ray Client address; jobs are submitted to the dashboard, "
                           "http://<head>:8265")
    if "://" not in address:
        address = f"http://{address}"
    return address.rstrip("/")


def auth_token() -> Token | None:
    """The cluster's token from where Ray looks for it, in Ray's order; None when there is none."""
    if value := os.environ.get("RAY_AUTH_TOKEN", "").strip():
        return Token(value, "$RAY_AUTH_TOKEN")
    if path := os.environ.get("RAY_AUTH_TOKEN_PATH"):
        try:
            value = Path(path).expanduser().read_text().strip()
        except OSError as exc:
            raise ClusterError(f"$RAY_AUTH_TOKEN_PATH names {path}, which cannot be read: {exc.strerror}") from None
        if not value:
            raise ClusterError(f"$RAY_AUTH_TOKEN_PATH names {path}, which is empty; {_GET_TOKEN}")
        return Token(value, f"$RAY_AUTH_TOKEN_PATH ({path})")
    default = Path.home() / ".ray" / "auth_token"
    if default.is_file() and (value := default.read_text().strip()):
        return Token(value, str(default))
    return None


def _check_reachable(url: str) -> None:
    """Fail fast, naming the address: requests would wait on a silent host for minutes."""
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        socket.create_connection((parts.hostname, port), timeout=_CONNECT_TIMEOUT_S).close()
    except OSError as exc:
        raise ClusterError(
            f"no Ray dashboard answers at {url} ({exc.strerror or exc}). Start the head with "
            "`ray start --head --dashboard-host=0.0.0.0` (it serves on port 8265), or forward the head's port "
            "here and use --address http://127.0.0.1:8265: `kubectl port-forward svc/<cluster>-head-svc "
            "8265:8265` on KubeRay, `ray dashboard <cluster.yaml>` for a `ray up` cluster"
        ) from None


def _auth_advice(url: str, token: Token | None) -> str:
    if token is None:
        return (f"{url} wants the cluster's auth token and none was found: set RAY_AUTH_TOKEN to it, or "
                f"RAY_AUTH_TOKEN_PATH to a file holding it, or write it to ~/.ray/auth_token; {_GET_TOKEN}")
    return f"{url} refused the auth token from {token.source}: set RAY_AUTH_TOKEN to this cluster's; {_GET_TOKEN}"


def connect(address: str | None) -> JobSubmissionClient:
    """A Jobs API client for the cluster at ``address`` (see ``dashboard_address``), its token checked."""
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    url = dashboard_address(address)
    _check_reachable(url)
    token = auth_token()
    headers = {"Authorization": f"Bearer {token.value}"} if token else None
    try:
        return JobSubmissionClient(url, headers=headers)  # asks for the version: the first authenticated call
    except AuthenticationError:
        raise ClusterError(_auth_advice(url, token)) from None
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise ClusterError(f"{url} answers, but not as a Ray dashboard ({exc}); the Jobs API is on the "
                           "dashboard's port, 8265 unless the head was started with another --dashboard-port, "
                           "not the GCS port (6379)") from None
