"""What travels with a job: this checkout as its working_dir, or nothing when the nodes run the project image.

Ray zips the working_dir on this machine and PUTs the zip to the dashboard, which takes requests of
at most ``DASHBOARD_CLIENT_MAX_SIZE`` (100 MiB in Ray 2.60; the GCS that stores the package would
take up to its gRPC limit, 512 MiB). A larger package fails only after the zipping, with an HTTP 413;
``check_size`` fails before, naming the biggest files. The files are listed with Ray's own
traversal, so the excludes and the ``.gitignore``/``.rayignore`` files count exactly as in the upload.

A project image is not a runtime_env ``image_uri``: in Ray 2.60 that runs each worker in a podman
container pulled on the node, whereas a KubeRay or ``ray up`` cluster built from the image runs it already.
"""

from __future__ import annotations

import logging
import os
import tomllib
from pathlib import Path
from typing import Any

from ngt_ray.cluster.connect import ClusterError

__all__ = ["EXCLUDES", "check_size", "packaged_files", "pip_pins", "project_root", "runtime_env", "upload_limit"]

# Nothing a job reads: the environment, VCS and tool caches, local data, and results. The packaged
# checkpoints stay: the job loads its models from ngt_ray/checkpoints.
EXCLUDES = (
    ".git", ".venv", "venv", "__pycache__", "*.egg-info", ".pytest_cache", ".ruff_cache", ".hypothesis",
    ".devbundle", ".gpudata", ".aside", "/build/", "/dist/", "/out/", "/docs/evaluation/", "*.csv",
    "*.pt", "!/ngt_ray/checkpoints/*.pt",
)
log = logging.getLogger(__name__)
_MIB = 2**20
_NAMED = 5  # biggest files the size error names


def upload_limit() -> int:
    """The largest package, in bytes, a job submission can carry."""
    from ray._private.ray_constants import DASHBOARD_CLIENT_MAX_SIZE
    from ray._private.runtime_env.packaging import GCS_STORAGE_MAX_SIZE

    return min(DASHBOARD_CLIENT_MAX_SIZE, GCS_STORAGE_MAX_SIZE)


def project_root() -> Path | None:
    """The checkout ``ngt_ray`` is imported from, or None for an installed package (no pyproject.toml beside it)."""
    root = Path(__file__).resolve().parents[2]
    return root if (root / "pyproject.toml").is_file() and (root / "ngt_ray").is_dir() else None


def packaged_files(root: Path, excludes: tuple[str, ...] = EXCLUDES) -> list[tuple[Path, int]]:
    """(path, bytes) of each file Ray would zip from ``root``."""
    from ray._private.ray_constants import RAY_RUNTIME_ENV_IGNORE_GITIGNORE
    from ray._private.runtime_env.packaging import _dir_travel, _get_excludes

    files: list[tuple[Path, int]] = []

    def add(path: Path) -> None:
        if path.is_file():
            files.append((path, path.stat().st_size))

    include_gitignore = os.environ.get(RAY_RUNTIME_ENV_IGNORE_GITIGNORE, "0") != "1"  # as the job client decides
    _dir_travel(root, [_get_excludes(root, list(excludes))], add, include_gitignore=include_gitignore, logger=log)
    return files


def check_size(root: Path, excludes: tuple[str, ...] = EXCLUDES) -> int:
    """The package's size in bytes, uncompressed (a bound on the zip: checkpoints barely compress);
    raises when it is over the upload limit."""
    files = packaged_files(root, excludes)
    total, limit = sum(size for _, size in files), upload_limit()
    if total >= limit:
        biggest = sorted(files, key=lambda f: -f[1])[:_NAMED]
        named = ", ".join(f"{path.relative_to(root)} ({size / _MIB:.1f} MiB)" for path, size in biggest)
        raise ClusterError(
            f"the working_dir {root} holds {total / _MIB:.1f} MiB for the job, over Ray's upload limit of "
            f"{limit / _MIB:.0f} MiB; the biggest files: {named}. List what the job does not need in "
            f"{root / '.rayignore'}, or build the project into the cluster's image and pass --image"
        )
    return total


def pip_pins(root: Path) -> list[str]:
    """The project's pinned dependencies but Ray, which the cluster runs already (a job cannot replace it)."""
    from packaging.requirements import Requirement

    pyproject = root / "pyproject.toml"
    try:
        dependencies = tomllib.loads(pyproject.read_text())["project"]["dependencies"]
    except (OSError, KeyError) as exc:
        raise ClusterError(f"--pip reads the pins from {pyproject}, which has none: {exc}") from None
    return [pin for pin in dependencies if Requirement(pin).name.lower() != "ray"]


def runtime_env(working_dir: Path | None, image: str | None, pip: bool) -> dict[str, Any]:
    """The job's runtime_env: the project (a checked working_dir, unless the nodes run ``image``) and,
    with ``pip``, its pins. Never ``env_vars``: see ``ngt_ray.cluster``."""
    root = working_dir or project_root()
    env: dict[str, Any] = {}
    if image is None:
        if root is None:
            raise ClusterError("no project checkout to upload (ngt_ray is installed as a package): pass "
                               "--working-dir <checkout>, or --image when the cluster's nodes run the project image")
        if not root.is_dir():
            raise ClusterError(f"--working-dir {root} is not a folder")
        check_size(root)
        env.update(working_dir=str(root), excludes=list(EXCLUDES))
    if pip:
        if root is None:
            raise ClusterError("--pip reads the pins from the project checkout's pyproject.toml, and there is none")
        env["pip"] = pip_pins(root)
    return env
