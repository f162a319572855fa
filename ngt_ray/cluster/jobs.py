"""The life of a submitted job: its status, its logs (followed to its end), stopping it, and the cluster's list."""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING

from ngt_ray.cluster.connect import ClusterError, OnDashboard, connect
from ngt_ray.options import option

if TYPE_CHECKING:
    from ray.job_submission import JobStatus, JobSubmissionClient

__all__ = ["JobConfig", "LogsConfig", "exit_code", "follow", "list_jobs", "logs", "status", "stop"]

_POLL_S = 0.5
# after its log stream ends a job is terminal within moments; a stop takes the driver's grace period
_SETTLE_S = 60.0


@dataclass(frozen=True, kw_only=True)
class JobConfig(OnDashboard):
    """One submitted job."""

    job_id: str | None = option(None, cli=False)


@dataclass(frozen=True, kw_only=True)
class LogsConfig(JobConfig):
    follow: bool = option(False, "stream the logs until the job ends")


def exit_code(status: JobStatus) -> int:
    return 0 if str(status) == "SUCCEEDED" else 1


@contextmanager
def _about(client: JobSubmissionClient, job_id: str) -> Iterator[None]:
    """The Jobs API's errors about one job, as messages that say what to do."""
    try:
        yield
    except RuntimeError as exc:
        if "does not exist" in str(exc):
            raise ClusterError(f"no job {job_id} at {client.get_address()}: `ngt-ray list` shows its jobs") from None
        raise ClusterError(f"the cluster at {client.get_address()} answered about {job_id}: {exc}") from None


def _job(cfg: JobConfig) -> tuple[JobSubmissionClient, str]:
    if not cfg.job_id:
        raise ClusterError("name the job: its submission id, as `ngt-ray submit` printed it or `ngt-ray list` shows")
    return connect(cfg.address), cfg.job_id


def settle(client: JobSubmissionClient, job_id: str, timeout: float = _SETTLE_S) -> JobStatus:
    """The job's status once terminal, or its last one after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    with _about(client, job_id):
        while not (state := client.get_job_status(job_id)).is_terminal() and time.monotonic() < deadline:
            time.sleep(_POLL_S)
    return state


def follow(client: JobSubmissionClient, job_id: str) -> JobStatus:
    """Stream the job's logs until it ends; its final status."""

    async def tail() -> None:
        async for chunk in client.tail_job_logs(job_id):
            sys.stdout.write(chunk)
            sys.stdout.flush()

    with _about(client, job_id):
        asyncio.run(tail())
    return settle(client, job_id)


def _when(ms: int | None) -> str:
    return datetime.fromtimestamp(ms / 1000).strftime("%Y-%m-%d %H:%M:%S") if ms else "-"


def status(cfg: JobConfig) -> int:
    client, job_id = _job(cfg)
    with _about(client, job_id):
        info = client.get_job_info(job_id)
    ended = f", ended {_when(info.end_time)}" if info.end_time else ""
    print(f"{job_id}: {info.status} (started {_when(info.start_time)}{ended})")
    if info.message:
        print(f"  {info.message}")
    return 0


def logs(cfg: LogsConfig) -> int:
    client, job_id = _job(cfg)
    if cfg.follow:
        print(f"{job_id}: {follow(client, job_id)}", file=sys.stderr)
        return 0
    with _about(client, job_id):
        print(client.get_job_logs(job_id), end="")
    return 0


def stop(cfg: JobConfig) -> int:
    """Ask the job to stop and wait until it has: 0 once it is STOPPED or had already ended."""
    client, job_id = _job(cfg)
    with _about(client, job_id):
        asked = client.stop_job(job_id)
    state = settle(client, job_id)
    print(f"{job_id}: {state}" + ("" if asked else " (it had already ended)"))
    return 0 if state.is_terminal() else 1


def list_jobs(cfg: OnDashboard) -> int:
    """The submitted jobs, oldest first (drivers started by hand on the cluster are left out)."""
    client = connect(cfg.address)
    submitted = sorted((j for j in client.list_jobs() if j.submission_id), key=lambda j: j.start_time or 0)
    print(f"{'submission id':<28} {'status':<10} {'started':<19}  entrypoint")
    for job in submitted:
        print(f"{job.submission_id:<28} {job.status!s:<10} {_when(job.start_time):<19}  {job.entrypoint}")
    return 0
