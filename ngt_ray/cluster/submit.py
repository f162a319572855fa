"""``ngt-ray submit``: run moderate, train, evaluate or benchmark as a Ray job on a cluster.

The entrypoint is ``python -m ngt_ray.cli <verb> ...`` run by the cluster's own interpreter, so no
path on this machine leaks into it; the verb's arguments are parsed here first, so a typo fails
before the upload. Credentials stay out of the job: see ``ngt_ray.cluster``.
"""

from __future__ import annotations

import argparse
import logging
import os
import shlex
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from ngt_ray.cluster import jobs
from ngt_ray.cluster.connect import ClusterError, OnDashboard, connect
from ngt_ray.cluster.package import runtime_env
from ngt_ray.options import option

__all__ = ["EPILOG", "SUBMITTABLE", "SubmitConfig", "entrypoint", "submit"]

SUBMITTABLE = ("moderate", "train", "evaluate", "benchmark")
_WHY_NOT = {
    "demo": "it builds its bucket on this machine; moderate a bucket the cluster can read instead",
    "calibrate": "it rewrites a checkpoint of this checkout, of which a job has only a temporary copy; run it here",
    "compress": "it writes a checkpoint into this checkout, of which a job has only a temporary copy; run it here",
}
# the verbs' options that name data to read or write, as opposed to the project's own files
_PATHS = ("input", "input_manifest", "manifest", "output")
# environment variables that hold keys; they stay on this machine
_CREDENTIALS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")
EPILOG = ("Keys in this environment (AWS_*) are not sent with the job: a runtime_env's env_vars are stored in "
          "plain text in the cluster's runtime_env_agent.log and in `ray job list`. The job reads S3 with the "
          "identity of the cluster's nodes (instance role, IRSA, workload identity). With token auth on the "
          "cluster, set RAY_AUTH_TOKEN (or RAY_AUTH_TOKEN_PATH, or ~/.ray/auth_token) to its token: "
          "`ray get-auth-token` on the head prints it.")


@dataclass(frozen=True, kw_only=True)
class SubmitConfig(OnDashboard):
    """One job submission: what runs, with which project files and resources, and whether to wait for it
    (``EPILOG`` says why no keys travel with it)."""

    verb: str | None = option(None, cli=False)
    verb_args: Sequence[str] = option((), cli=False)
    working_dir: Path | None = option(None, "project checkout uploaded as the job's working_dir (default: the "
                                            "checkout ngt_ray runs from)")
    image: str | None = option(None, "the cluster's nodes run this project image: upload nothing (the name is "
                                     "recorded in the job's metadata)")
    pip: bool = option(False, "install the pinned dependencies of pyproject.toml (but Ray) into the job's "
                              "environment, for a cluster that runs plain Ray")
    python: str = option("python", "the cluster's interpreter that runs the verb (on its nodes' PATH)")
    entrypoint_num_cpus: float | None = option(None, "CPUs reserved for the verb's own process")
    entrypoint_num_gpus: float | None = option(None, "GPUs reserved for the verb's own process: train and evaluate "
                                                     "run their models there; moderate's actors reserve their own")
    submission_id: str | None = option(None, "the job's id (default: one Ray makes up)")
    wait: bool = option(True, "follow the job's logs to its end and exit with its status (0: succeeded)")


def entrypoint(python: str, verb: str, verb_args: Sequence[str]) -> str:
    """The shell command the cluster runs, every argument quoted."""
    return shlex.join([python, "-m", "ngt_ray.cli", verb, *verb_args])


def _check_verb(verb: str | None) -> str:
    if verb in SUBMITTABLE:
        return verb
    if verb is None:
        raise ClusterError(f"name the verb to run on the cluster, one of {', '.join(SUBMITTABLE)}: "
                           "ngt-ray submit [options] moderate --input ... --output ...")
    reason = _WHY_NOT.get(verb, "it is no verb that runs on a cluster")
    raise ClusterError(f"{verb!r} cannot be submitted ({reason}); a job runs one of {', '.join(SUBMITTABLE)}")


def _is_relative(path: str | Path | None) -> bool:
    return path is not None and "://" not in str(path) and not Path(path).is_absolute()


def _check_paths(verb: str, args: argparse.Namespace) -> None:
    """A relative path would resolve in the job's temporary copy of the project, on the node that runs the verb."""
    given = {name: getattr(args, name, None) for name in _PATHS}
    relative = [f"--{name.replace('_', '-')} {value}" for name, value in given.items() if _is_relative(value)]
    if not relative:
        return
    message = (f"{' and '.join(relative)} would resolve inside the job's temporary copy of the project on the "
               "cluster: give an s3:// URL, or an absolute path on storage every node mounts")
    if verb == "moderate":  # its flags are written by tasks on many nodes
        raise ClusterError(message)
    print(f"note: {message}", file=sys.stderr)


def _landing(verb: str, args: argparse.Namespace) -> str | None:
    if verb != "moderate":
        return None
    out = args.output.rstrip("/")
    return f"flags: {out}/flags/   stats: {out}/stats.parquet"


def submit(cfg: SubmitConfig, parse: Callable[[list[str]], argparse.Namespace]) -> int:
    """Submit ``cfg.verb``; with ``cfg.wait``, follow it: 0 when it succeeded, 1 when it did not.

    ``parse`` is the command line's own parser (``ngt-ray <verb> <args>``), handed in by the CLI
    that sits above this module: the verb's arguments fail here, before anything is uploaded.
    """
    verb = _check_verb(cfg.verb)
    args = parse([verb, *cfg.verb_args])
    _check_paths(verb, args)
    env = runtime_env(cfg.working_dir, cfg.image, cfg.pip)
    if held := [name for name in _CREDENTIALS if os.environ.get(name)]:
        print(f"note: {', '.join(held)} stay here; the job reads S3 with the cluster nodes' own identity",
              file=sys.stderr)
    client = connect(cfg.address)
    if "working_dir" in env:
        print(f"packaging {env['working_dir']} as the job's working_dir ...", file=sys.stderr)
        if not logging.getLogger().isEnabledFor(logging.INFO):  # Ray notes each ignore file as it zips; -v shows them
            logging.getLogger("ray._private.runtime_env").setLevel(logging.WARNING)
    metadata = {"ngt_ray_verb": verb, **({"image": cfg.image} if cfg.image else {})}
    try:
        job_id = client.submit_job(
            entrypoint=entrypoint(cfg.python, verb, cfg.verb_args), runtime_env=env, metadata=metadata,
            submission_id=cfg.submission_id, entrypoint_num_cpus=cfg.entrypoint_num_cpus,
            entrypoint_num_gpus=cfg.entrypoint_num_gpus,
        )
    except RuntimeError as exc:  # the Jobs API's answer to a bad request: a duplicate id, a refused package
        raise ClusterError(f"the cluster at {client.get_address()} refused the job: {exc}") from None
    address = client.get_address()
    again = f"--address {shlex.quote(address)}"
    print(f"submitted {verb} as {job_id}\n  dashboard: {address}/#/jobs/{job_id}")
    if landing := _landing(verb, args):
        print(f"  {landing}")
    if not cfg.wait:
        print(f"  follow: ngt-ray logs {job_id} --follow {again}\n  stop:   ngt-ray stop {job_id} {again}")
        return 0
    try:
        status = jobs.follow(client, job_id)
    except KeyboardInterrupt:
        print(f"\nstopped following; {job_id} runs on: ngt-ray stop {job_id} {again}", file=sys.stderr)
        return 130
    print(f"{job_id}: {status}")
    return jobs.exit_code(status)
