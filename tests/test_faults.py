"""Storage faults are retried, then isolated: the fault proxy (tests/faultproxy.py) in front of a real S3
server on loopback, first under ``fetch`` alone, then under the whole job on real photos, then a worker
node killed mid-run on a two-node cluster.

For every fault the job completes, every object has exactly one row, and every row that is not an error
carries the decision the same photos get without faults (a truncated body is never scored as an image).
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import s3fs
from faultproxy import FAULTS, FaultProxy

from ngt_ray.job.fetch import BucketError, RetryPolicy, StorageUnavailable, classify, clean, fetch
from ngt_ray.job.pipeline import ModerationConfig, run_moderation

FAST = RetryPolicy(base=0.01, cap=0.05)  # same attempts, no waiting: fetch-level tests
RATE = 0.05  # the injected rate for the job runs
_TABLE: list[dict] = []  # fault, rate, rows in/out, retries, error rows, wall time: printed at the end


# -- fetch alone, against the proxy ---------------------------------------------------------------

@pytest.fixture(scope="module")
def blobs(s3_server) -> dict[str, bytes]:
    """24 objects of random bytes in bucket ``fetch`` (put directly, not through the proxy)."""
    fs = s3fs.S3FileSystem(endpoint_url=s3_server["endpoint"], skip_instance_cache=True)
    fs.mkdir("fetch")
    rng = random.Random(0)
    objects = {f"fetch/obj-{i:02d}.bin": rng.randbytes(rng.randrange(20_000, 200_000)) for i in range(24)}
    for path, data in objects.items():
        fs.pipe_file(path, data)
    return objects


def _client(proxy: FaultProxy, **config) -> s3fs.S3FileSystem:
    return s3fs.S3FileSystem(endpoint_url=proxy.endpoint, skip_instance_cache=True, config_kwargs=config)


@pytest.mark.parametrize("fault", FAULTS)
def test_transient_faults_are_retried_until_read(s3_server, blobs, fault):
    with FaultProxy(s3_server["endpoint"], fault, rate=0.3, seed=1, delay_s=0.5) as proxy:
        got = fetch(_client(proxy), list(blobs), policy=FAST)
    assert got.results == list(blobs.values())  # every object, whole, in order
    assert proxy.injected[fault] > 0, proxy.summary()
    if fault == "delay":  # slow is not failed: nothing retried
        assert got.retries == 0 and proxy.object_gets == len(blobs)
    else:
        assert got.retries >= 1 and proxy.object_gets > len(blobs)


_REASONS = {"slowdown": "SlowDown (HTTP 503): Please reduce your request rate.",
            "internal": "InternalError (HTTP 500): We encountered an internal error",
            "reset": "connection reset or closed by the server",
            "truncate": "truncated body (",
            "delay": "read timed out"}


@pytest.mark.parametrize("fault", FAULTS)
def test_an_object_that_keeps_failing_is_an_error_after_every_attempt(s3_server, blobs, fault):
    bad = "fetch/obj-03.bin"
    with FaultProxy(s3_server["endpoint"], always={bad: fault}, delay_s=1.0) as proxy:
        got = fetch(_client(proxy, read_timeout=0.3), list(blobs), policy=FAST)
    results = dict(zip(blobs, got.results))
    error = results.pop(bad)
    assert results == {k: v for k, v in blobs.items() if k != bad}
    assert error.attempts == FAST.attempts and error.uri == f"s3://{bad}"
    assert str(error).startswith(f"read failed after {FAST.attempts} attempts: {_REASONS[fault]}"), str(error)
    assert "0x" not in str(error) and "?" not in str(error)
    if fault == "truncate":
        assert f"of {len(blobs[bad])} bytes" in str(error)


def test_permanent_object_errors_are_not_retried(s3_server, blobs):
    always = {"fetch/obj-01.bin": "nosuchkey", "fetch/obj-02.bin": "accessdenied"}
    with FaultProxy(s3_server["endpoint"], always=always) as proxy:
        got = fetch(_client(proxy), list(blobs), policy=FAST)
    errors = {e.uri: e for e in got.errors}
    assert set(errors) == {f"s3://{k}" for k in always} and got.retries == 0
    assert str(errors["s3://fetch/obj-01.bin"]) == ("read failed after 1 attempt: NoSuchKey (HTTP 404): "
                                                    "The specified key does not exist.")
    assert errors["s3://fetch/obj-02.bin"].code == "AccessDenied"


def test_a_bucket_that_refuses_stops_the_run(s3_server, blobs, monkeypatch):
    everyone = dict.fromkeys(blobs, "accessdenied")
    with FaultProxy(s3_server["endpoint"], always=everyone) as proxy, \
            pytest.raises(BucketError, match=r"AccessDenied \(HTTP 403\).*s3://fetch/obj-.*24 of 24 objects"):
        fetch(_client(proxy), list(blobs), policy=FAST)
    with pytest.raises(BucketError, match="NoSuchBucket"):  # the real server's answer
        fetch(s3fs.S3FileSystem(endpoint_url=s3_server["endpoint"], skip_instance_cache=True),
              ["no-such-bucket/a.jpg", "no-such-bucket/b.jpg"], policy=FAST)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    with pytest.raises(BucketError, match="SignatureDoesNotMatch") as raised:
        fetch(s3fs.S3FileSystem(endpoint_url=s3_server["endpoint"], skip_instance_cache=True), list(blobs)[:1],
              policy=FAST)
    assert "not-the-secret" not in str(raised.value)


def test_an_unreachable_store_stops_the_run(s3_server, blobs):
    proxy = FaultProxy(s3_server["endpoint"]).start()
    client = _client(proxy)
    proxy.stop()
    with pytest.raises(StorageUnavailable, match=f"cannot connect to 127.0.0.1:{proxy.port}.*resumes"):
        fetch(client, list(blobs), policy=FAST)


def test_a_read_shorter_than_the_listed_size_is_truncated(s3_server, blobs):
    sizes = [len(v) + (1 if k.endswith("-05.bin") else 0) for k, v in blobs.items()]
    got = fetch(s3fs.S3FileSystem(endpoint_url=s3_server["endpoint"], skip_instance_cache=True), list(blobs),
                sizes=sizes, policy=FAST)
    [error] = got.errors
    assert error.code == "TruncatedBody" and "truncated body" in str(error) and error.attempts == FAST.attempts


def test_local_files_that_cannot_be_read(tmp_path):
    import fsspec

    (tmp_path / "ok.jpg").write_bytes(b"x")
    (tmp_path / "gone.jpg").symlink_to(tmp_path / "missing.jpg")
    (tmp_path / "dir.jpg").mkdir()
    got = fetch(fsspec.filesystem("file"), [str(tmp_path / n) for n in ("ok.jpg", "gone.jpg", "dir.jpg")],
                policy=FAST)
    assert got.results[0] == b"x" and [e.code for e in got.errors] == ["NotFound", "NotAFile"]
    assert got.retries == 0


def test_messages_carry_no_addresses_queries_or_passwords():
    import io

    message = clean(f"cannot identify image file {io.BytesIO()!r} from "
                    "https://user:pw@b.s3.amazonaws.com/k.jpg?X-Amz-Signature=abc&X-Amz-Credential=AKIA")
    assert message == "cannot identify image file from https://b.s3.amazonaws.com/k.jpg?<query removed>"
    kind, code, reason = classify(ValueError(f"bad {object()!r}"))
    assert (kind, code) == ("object", "ValueError") and "0x" not in reason


# -- the job, through the proxy, on real photos ---------------------------------------------------

@pytest.fixture(scope="module")
def photo_bucket(planted, s3_server) -> dict:
    """Twice the planted photos under two prefixes of names: bucket ``faults``, prefix ``photos/``."""
    fs = s3fs.S3FileSystem(endpoint_url=s3_server["endpoint"], skip_instance_cache=True)
    fs.mkdir("faults")
    fs.pipe({f"faults/photos/{copy}-{p.name}": p.read_bytes() for p in planted.root.iterdir() for copy in "ab"})
    keys = sorted(fs.find("faults/photos"))
    assert len(keys) == 2 * planted.count >= 60
    return {"url": "s3://faults/photos", "uris": [f"s3://{k}" for k in keys], "keys": keys}


_JOB = {"stub_models": True, "measure_time": False, "group_size": 8, "batch_size": 16}


def _moderate(out: Path, endpoint: str, **kw) -> tuple[list[dict], dict]:
    cfg = ModerationConfig(input="s3://faults/photos", output=str(out), s3_endpoint=endpoint, **{**_JOB, **kw})
    stats = run_moderation(cfg)
    return pq.read_table(out / "flags").to_pylist(), stats


@pytest.fixture(scope="module")
def clean_run(ray_local, photo_bucket, s3_server, tmp_path_factory) -> dict[str, dict]:
    """The same photos without faults: what every scored row must match."""
    rows, stats = _moderate(tmp_path_factory.mktemp("clean") / "out", s3_server["endpoint"])
    assert sorted(r["uri"] for r in rows) == photo_bucket["uris"] and stats["errors"] == 0
    return {r["uri"]: r for r in rows}


def _decision(row: dict) -> tuple:
    return row["decided_by"], row["flagged"], row["score"], row["group_id"], row["group_score"]


def _check_rows(rows: list[dict], photo_bucket: dict, clean_run: dict[str, dict] | None) -> list[dict]:
    """Every object exactly once; a row that is not an error was scored (with ``clean_run``: exactly as
    without faults, groups included, which holds while no object fails). The error rows."""
    assert sorted(r["uri"] for r in rows) == photo_bucket["uris"]
    errors = [r for r in rows if r["decided_by"] == "error"]
    for r in rows:
        if r["decided_by"] != "error":
            assert r["error"] is None and r["score"] is not None and r["decided_by"] in ("group", "subgroup", "retest")
            if clean_run is not None:
                assert _decision(r) == pytest.approx(_decision(clean_run[r["uri"]])), r["uri"]
        else:
            assert r["error"] and r["score"] is None and not r["flagged"]
    return errors


def _record(fault: str, rate: float, proxy: FaultProxy, objects: int, rows: int, errors: int, wall: float) -> None:
    _TABLE.append({"fault": fault, "rate": rate, "objects": objects, "rows": rows, "object_gets": proxy.object_gets,
                   "injected": sum(proxy.injected.values()), "retries": proxy.object_gets - objects,
                   "error_rows": errors, "wall_s": wall})


@pytest.fixture(scope="module", autouse=True)
def _print_table(request):
    """The table, past pytest's capture (a passing run shows it too); also written as markdown to
    ``$NGT_RAY_FAULT_REPORT`` where set (``jobs/fault_report.py``)."""
    yield
    if _TABLE:
        lines = markdown_table(_TABLE)
        with request.config.pluginmanager.get_plugin("capturemanager").global_and_fixture_disabled():
            print("\n".join(["", "fault harness:", *lines]), flush=True)
        if os.environ.get("NGT_RAY_FAULT_REPORT"):
            Path(os.environ["NGT_RAY_FAULT_REPORT"]).write_text("\n".join(lines) + "\n")


def markdown_table(rows: list[dict]) -> list[str]:
    head = "| fault | rate | rows in | rows out | object GETs | injected | retries | error rows | wall s |"
    lines = [head, "|---" * (head.count("|") - 1) + "|"]
    for r in rows:
        lines.append(f"| {r['fault']} | {r['rate']:.0%} | {r['objects']} | {r['rows']} | {r['object_gets']} | "
                     f"{r['injected']} | {r['retries']} | {r['error_rows']} | {r['wall_s']:.1f} |")
    return lines


@pytest.mark.parametrize("fault", FAULTS)
def test_job_completes_every_object_once_under_faults(fault, photo_bucket, s3_server, clean_run, tmp_path):
    n = len(photo_bucket["uris"])
    # seed 5: 4 of the 64 first GETs are faulted, and one object's second GET too
    with FaultProxy(s3_server["endpoint"], fault, rate=RATE, seed=5) as proxy:
        start = time.perf_counter()
        rows, stats = _moderate(tmp_path / "out", proxy.endpoint)
        wall = time.perf_counter() - start
    errors = _check_rows(rows, photo_bucket, clean_run)
    _record(fault, RATE, proxy, n, len(rows), len(errors), wall)
    assert proxy.injected[fault] > 0, proxy.summary()
    assert not errors and stats["images"] == n and stats["errors"] == 0  # 5 attempts outlast a 5 % fault
    if fault != "delay":
        assert proxy.object_gets > n  # the faulted reads were read again


def test_job_isolates_objects_that_cannot_be_read(ray_local, photo_bucket, s3_server, tmp_path):
    """Two objects fail for good: their rows say why, every other object is scored (in other groups than
    without the two, so decisions are not compared)."""
    never, gone = photo_bucket["keys"][5], photo_bucket["keys"][40]
    with FaultProxy(s3_server["endpoint"], always={never: "internal", gone: "nosuchkey"}) as proxy:
        start = time.perf_counter()
        rows, stats = _moderate(tmp_path / "out", proxy.endpoint)
        wall = time.perf_counter() - start
    errors = {r["uri"]: r["error"] for r in _check_rows(rows, photo_bucket, None)}
    _record("internal + nosuchkey on 2 objects", 2 / len(rows), proxy, len(photo_bucket["uris"]), len(rows),
            len(errors), wall)
    assert errors == {f"s3://{never}": "read failed after 5 attempts: InternalError (HTTP 500): We encountered an "
                                       "internal error. Please try again.",
                      f"s3://{gone}": "read failed after 1 attempt: NoSuchKey (HTTP 404): The specified key does "
                                      "not exist."}
    assert stats["errors"] == 2 and proxy.attempts[never] == 5 and proxy.attempts[gone] == 1


def test_store_down_mid_run_stops_the_run_and_the_same_command_resumes(photo_bucket, s3_server, clean_run, tmp_path):
    """An outage is not the objects' fault: error rows would be final (a resumed run skips them), so the
    run stops with a clear message, and the same command, once the store is back, reads only the rest."""
    n = len(photo_bucket["uris"])
    proxy = FaultProxy(s3_server["endpoint"], down_after=3 * n // 4).start()
    start = time.perf_counter()
    try:
        with pytest.raises(Exception, match=r"object store is unavailable: cannot connect to 127\.0\.0\.1") as raised:
            _moderate(tmp_path / "out", proxy.endpoint, rows_per_file=8)
        assert "0x" not in str(raised.value).split("Traceback")[0]
        first_gets, proxy.down_after = proxy.object_gets, None
        proxy.start()  # the same port: the same command
        rows, stats = _moderate(tmp_path / "out", proxy.endpoint, rows_per_file=8)
    finally:
        proxy.stop()
    errors = _check_rows(rows, photo_bucket, clean_run)
    _record(f"store down after {first_gets - 1} GETs: run stopped; resumed ({stats['resumed_rows']} rows kept, "
            f"{proxy.object_gets - first_gets} GETs)", 0.0, proxy, n, len(rows), len(errors),
            time.perf_counter() - start)
    assert not errors and stats["images"] == n and 0 <= stats["resumed_rows"] < n


# -- an actor or a node killed mid-run -------------------------------------------------------------

def _children_running(parent: int, name: bytes) -> list[int]:
    """Processes whose parent is ``parent`` (a raylet: its workers) and whose title holds ``name``."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            if ppid == parent and name in (stat.parent / "cmdline").read_bytes():
                pids.append(int(stat.parent.name))
        except (OSError, ValueError, IndexError):  # gone meanwhile, or not ours to read
            continue
    return pids


def test_model_actor_killed_mid_run(ray_local, photo_bucket, s3_server, clean_run, tmp_path):
    """SIGKILL of a model actor once a third of the objects were asked for (every GET slowed, so the run
    is still going): Ray restarts it and redoes its batches; every object once, decisions as without."""
    import signal
    import threading

    from ray._private import ray_constants
    from ray._private.worker import _global_node

    raylet = _global_node.all_processes[ray_constants.PROCESS_TYPE_RAYLET][0].process.pid
    n, killed = len(photo_bucket["uris"]), []
    proxy = FaultProxy(s3_server["endpoint"], "delay", rate=1.0, delay_s=0.2).start()

    def kill_one_actor() -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not killed:
            actors = _children_running(raylet, b"Moderator")
            if actors and proxy.object_gets >= n // 3:
                os.kill(actors[0], signal.SIGKILL)
                killed.append((actors[0], proxy.object_gets))
            time.sleep(0.05)

    killer = threading.Thread(target=kill_one_actor, daemon=True)
    killer.start()
    start = time.perf_counter()
    try:
        rows, stats = _moderate(tmp_path / "out", proxy.endpoint)
    finally:
        proxy.stop()
        killed.append(None)  # stops the killer if it has not fired
        killer.join()
    assert killed[0] is not None, "no model actor was killed"
    errors = _check_rows(rows, photo_bucket, clean_run)
    _record(f"model actor SIGKILLed after {killed[0][1]} GETs (every GET delayed)", 1.0, proxy, n, len(rows),
            len(errors), time.perf_counter() - start)
    assert not errors and stats["images"] == n


def test_worker_node_killed_mid_run(photo_bucket, s3_server, tmp_path):
    """Two nodes (``ray.cluster_utils.Cluster``), the job as a subprocess reading through a proxy that slows
    every GET; once a third of the objects were asked for, the worker node is killed (SIGKILL of its
    raylet and workers). Every object gets exactly one row, and the job completes on the head."""
    from ray.cluster_utils import Cluster

    n = len(photo_bucket["uris"])
    node = {"object_store_memory": 200 * 2**20, "include_dashboard": False}
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, **node})
    proxy = FaultProxy(s3_server["endpoint"], "delay", rate=1.0, delay_s=0.2).start()
    out, job = tmp_path / "out", None
    try:
        worker = cluster.add_node(num_cpus=1, **node)
        cluster.wait_for_nodes()
        start = time.perf_counter()
        job = subprocess.Popen(
            [sys.executable, "-m", "ngt_ray.cli", "moderate", "--input", photo_bucket["url"], "--output", str(out),
             "--s3-endpoint", proxy.endpoint, "--ray-address", cluster.address, "--stub-models", "--batch-size", "4",
             "--group-size", "4", "--no-measure-time", "--actor-start-timeout", "120"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + 120
        while proxy.object_gets < n // 3 and job.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert job.poll() is None, f"the job ended before the kill: {job.stdout.read()[-3000:]}"
        killed_at = proxy.object_gets
        cluster.remove_node(worker, allow_graceful=False)
        output, _ = job.communicate(timeout=240)
        wall = time.perf_counter() - start
    finally:
        if job is not None and job.poll() is None:
            job.kill()
            job.wait()
        proxy.stop()
        cluster.shutdown()
    uris = pq.read_table(out / "flags", columns=["uri"]).column("uri").to_pylist()
    errors = pq.read_table(out / "flags", columns=["decided_by"]).column("decided_by").to_pylist().count("error")
    _record(f"worker node killed after {killed_at} GETs (every GET delayed); job exit {job.returncode}", 1.0, proxy,
            n, len(uris), errors, wall)
    assert sorted(uris) == photo_bucket["uris"], output[-3000:]  # every object exactly once
    assert job.returncode == 0, output[-4000:]
    stats = pq.read_table(out / "stats.parquet").to_pylist()[0]
    assert stats["images"] == n and stats["errors"] == errors == 0
