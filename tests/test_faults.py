"""Storage faults are retried, then isolated: the fault proxy (tests/faultproxy.py) in front of a real S3
server on loopback, first under ``fetch`` and ``put`` alone, then under the whole job on real photos (as
image objects, WebDataset shards and Parquet files, and with the output on the flaky store), then a worker
node killed mid-run on a two-node cluster.

For every fault the job completes, every object has exactly one row, and every row that is not an error
carries the decision the same photos get without faults (a truncated body is never scored as an image).
"""

from __future__ import annotations

import errno
import io
import os
import random
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import s3fs
from faultproxy import FAULTS, FaultProxy

from ngt_ray.job.fetch import (
    BucketError,
    RetryPolicy,
    StorageError,
    StorageUnavailable,
    classify,
    clean,
    fetch,
    put,
    retrying_writes,
)
from ngt_ray.job.outputs import SUCCESS
from ngt_ray.job.pipeline import ModerationConfig, run_moderation
from ngt_ray.job.sources import _list_containers, _read_containers
from ngt_ray.storage import resolve

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
    cfg = ModerationConfig(**{"input": "s3://faults/photos", "output": str(out), "s3_endpoint": endpoint, **_JOB, **kw})
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


def _record(fault: str, rate: float, proxy: FaultProxy, objects: int, rows: int, errors: int, wall: float,
            retries: int | None = None) -> None:
    """One row of the table; ``retries``: where they are not GETs beyond one per object (packed inputs, writes)."""
    _TABLE.append({"fault": fault, "rate": rate, "objects": objects, "rows": rows, "object_gets": proxy.object_gets,
                   "injected": sum(proxy.injected.values()),
                   "retries": proxy.object_gets - objects if retries is None else retries,
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


# -- ranged reads, one object alone, and writes: the fetch layer against the proxy -------------------

@pytest.mark.parametrize("fault", ["slowdown", "truncate"])
def test_ranged_reads_are_retried_until_read(s3_server, blobs, fault):
    ranges = [(7, 7 + len(v) // 3) for v in blobs.values()]
    with FaultProxy(s3_server["endpoint"], fault, rate=0.3, seed=1) as proxy:
        # as storage.resolve configures it: the test server answers a range with the whole object's checksum
        client = _client(proxy, response_checksum_validation="when_required")
        got = fetch(client, list(blobs), ranges=ranges, policy=FAST)
    assert got.results == [v[a:b] for v, (a, b) in zip(blobs.values(), ranges)]
    assert proxy.injected[fault] > 0 and got.retries == proxy.object_gets - len(blobs) > 0


def test_one_object_read_alone_is_an_error_unless_the_store_fails_too(s3_server, blobs):
    """A shard read alone that fails every attempt: the store answers a HEAD about it, so it is that
    object's error; when the HEAD fails too, the store is down and the run stops."""
    key = "fetch/obj-04.bin"
    with FaultProxy(s3_server["endpoint"], always={key: "internal"}) as proxy:
        [error] = fetch(_client(proxy), [key], policy=FAST).errors
    assert error.attempts == FAST.attempts and proxy.requests["HEAD"] == 1
    with FaultProxy(s3_server["endpoint"], "internal", rate=1.0, methods=("GET", "HEAD")) as proxy, \
            pytest.raises(StorageUnavailable, match=r"InternalError \(HTTP 500\).*reading s3://fetch/obj-04\.bin"):
        fetch(_client(proxy), [key], policy=FAST)


@pytest.fixture(scope="module")
def out_bucket(s3_server) -> s3fs.S3FileSystem:
    """Bucket ``faults-out``, read directly (not through the proxy; ranged reads as storage.resolve reads)."""
    fs = s3fs.S3FileSystem(endpoint_url=s3_server["endpoint"], skip_instance_cache=True,
                           config_kwargs={"response_checksum_validation": "when_required"})
    fs.mkdir("faults-out")
    return fs


@pytest.mark.parametrize("fault", ["slowdown", "internal", "reset"])
def test_writes_are_retried_until_written(s3_server, blobs, out_bucket, fault):
    keys = {f"faults-out/put-{fault}/{k.rsplit('/', 1)[1]}": v for k, v in blobs.items()}
    with FaultProxy(s3_server["endpoint"], fault, rate=0.3, seed=1, methods=("PUT",)) as proxy:
        attempts = [put(_client(proxy), k, v, policy=FAST) for k, v in keys.items()]
    assert proxy.injected[fault] > 0 and proxy.object_gets == 0 and proxy.client_retries["PUT"] == 0
    assert sum(proxy.puts.values()) == len(keys) + proxy.injected[fault]
    if fault == "reset":  # aiohttp itself sends a PUT once more when a kept-alive connection was reset
        assert len(keys) < sum(attempts) <= sum(proxy.puts.values())
    else:
        assert sum(attempts) == sum(proxy.puts.values())  # every retry counted
    assert {k: out_bucket.cat_file(k) for k in keys} == keys


def test_a_write_that_keeps_failing_stops_the_run(s3_server, out_bucket):
    key = "faults-out/never/run.json"
    with FaultProxy(s3_server["endpoint"], always={key: "slowdown"}, methods=("PUT",)) as proxy, pytest.raises(
            StorageUnavailable, match=r"SlowDown \(HTTP 503\).*writing s3://faults-out/never/run\.json, after 5 "
                                      r"attempts.*same command resumes"):
        put(_client(proxy), key, b"{}", policy=FAST)
    assert proxy.puts[key] == FAST.attempts and not out_bucket.exists(key)


def test_local_writes_are_complete_or_absent(tmp_path, monkeypatch):
    local = fsspec.filesystem("file")
    assert put(local, str(tmp_path / "a.parquet"), b"x" * 100, policy=FAST) == 1
    assert os.listdir(tmp_path) == ["a.parquet"] and (tmp_path / "a.parquet").read_bytes() == b"x" * 100

    def disk_gone(src, dst):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr("ngt_ray.job.fetch.os.replace", disk_gone)  # the rename never happens
    with pytest.raises(StorageError, match=r"cannot write .*b\.parquet: .*Input/output error"):
        put(local, str(tmp_path / "b.parquet"), b"y" * 100, policy=FAST)
    assert os.listdir(tmp_path) == ["a.parquet"]  # neither a half file nor its temporary


def test_parquet_through_retrying_writes_arrives_whole(s3_server, out_bucket):
    table = pa.table({"uri": [f"s3://b/{i}.jpg" for i in range(2000)], "score": np.arange(2000, dtype=np.float32)})
    with FaultProxy(s3_server["endpoint"], "reset", rate=0.3, seed=3, methods=("PUT",)) as proxy:
        writes = retrying_writes(_client(proxy), FAST)
        for i in range(8):
            pq.write_table(table, f"faults-out/arrow/{i}.parquet", filesystem=writes)
    assert proxy.injected["reset"] > 0 and sum(proxy.puts.values()) == 8 + proxy.injected["reset"]
    for i in range(8):
        assert pq.read_table(f"faults-out/arrow/{i}.parquet", filesystem=out_bucket).equals(table)


# -- packed inputs (WebDataset shards, Parquet files) and the writes, in the job ---------------------

# The seed of the packed and write runs: at 5 % it fails the first GET of 2 of the 8 shards, 2 of the 9
# first Parquet reads (the driver reads the first file's footer) and 2 of the first 11 PUTs.
SEED = 137
_CONTAINERS = 8


@pytest.fixture(scope="module")
def packed_bucket(photo_bucket, planted, s3_server) -> dict[str, dict]:
    """The 64 samples of ``photo_bucket`` packed into 8 WebDataset shards (``faults/shards/``, an image
    and a label per sample) and 8 Parquet files (``faults/table/``, key and image columns); bucket
    ``faults`` is ``photo_bucket``'s."""
    fs = s3fs.S3FileSystem(endpoint_url=s3_server["endpoint"], skip_instance_cache=True)
    samples = [(f"{copy}-{p.stem}", p.read_bytes()) for p in sorted(planted.root.iterdir()) for copy in "ab"]
    per = len(samples) // _CONTAINERS
    packed: dict[str, dict] = {"webdataset": {"url": "s3://faults/shards", "uris": []},
                               "parquet": {"url": "s3://faults/table", "uris": []}}
    for i in range(_CONTAINERS):
        part = samples[i * per:(i + 1) * per]
        shard, table = f"faults/shards/shard-{i:05d}.tar", f"faults/table/part-{i:05d}.parquet"
        tar_bytes = io.BytesIO()
        with tarfile.open(fileobj=tar_bytes, mode="w") as tar:
            for key, data in part:
                for name, member in ((f"{key}.jpg", data), (f"{key}.cls", b"0")):
                    info = tarfile.TarInfo(name)
                    info.size = len(member)
                    tar.addfile(info, io.BytesIO(member))
        table_bytes = pa.BufferOutputStream()
        pq.write_table(pa.table({"key": [k for k, _ in part], "image": [d for _, d in part]}), table_bytes)
        fs.pipe({shard: tar_bytes.getvalue(), table: table_bytes.getvalue().to_pybytes()})
        packed["webdataset"]["uris"] += [f"s3://{shard}#{k}" for k, _ in part]
        packed["parquet"]["uris"] += [f"s3://{table}#{k}" for k, _ in part]
    for fmt in packed.values():
        fmt["uris"].sort()
    assert len(packed["parquet"]["uris"]) == 2 * planted.count
    return packed


@pytest.fixture(scope="module")
def packed_clean(ray_local, packed_bucket, s3_server, tmp_path_factory) -> dict[str, dict[str, dict]]:
    """The packed inputs read without faults: what every scored row must match, per format."""
    runs = {}
    for fmt, packed in packed_bucket.items():
        rows, stats = _moderate(tmp_path_factory.mktemp(f"clean-{fmt}") / "out", s3_server["endpoint"],
                                input=packed["url"])
        assert sorted(r["uri"] for r in rows) == packed["uris"] and stats["errors"] == 0
        runs[fmt] = {r["uri"]: r for r in rows}
    return runs


def _read_packed(fmt: str, endpoint: str, **kw) -> list[tuple[str, bytes, str]]:
    """``(uri, bytes, error)`` of every row ``_read_containers`` makes of the packed input, without Ray."""
    loc = resolve(f"s3://faults/{'shards' if fmt == 'webdataset' else 'table'}", endpoint)
    entries = _list_containers(loc, fmt)
    batch = {"path": np.array([e.path for e in entries], dtype=object), "size": np.array([e.size for e in entries]),
             "problem": np.full(len(entries), None), "problem_kind": np.full(len(entries), None)}
    columns = ("key", "image") if fmt == "parquet" else None
    return [row for out in _read_containers(batch, loc, fmt, columns, rows=16, **kw)
            for row in zip(out["uri"], out["bytes"], out["error"])]


@pytest.mark.parametrize("fmt", ["webdataset", "parquet"])
def test_a_container_too_large_to_read_whole_is_read_in_retried_pieces(packed_bucket, s3_server, fmt):
    """Every container read in ranged pieces of 32 kB (as one over MAX_OBJECT_BYTES is): a faulted piece is
    read again, and the rows are those of whole reads."""
    whole = _read_packed(fmt, s3_server["endpoint"])
    with FaultProxy(s3_server["endpoint"]) as clean_proxy:
        assert _read_packed(fmt, clean_proxy.endpoint, whole=0, chunk=32_000) == whole
    pieces = clean_proxy.object_gets
    with FaultProxy(s3_server["endpoint"], "truncate", rate=RATE, seed=SEED) as proxy:
        assert _read_packed(fmt, proxy.endpoint, whole=0, chunk=32_000) == whole
    assert sorted(uri for uri, _, _ in whole) == packed_bucket[fmt]["uris"] and not any(e for _, _, e in whole)
    # a shard in pieces of 32 kB; a Parquet file's footer, then its pages (8 photos: one page)
    assert pieces >= (4 if fmt == "webdataset" else 2) * _CONTAINERS and proxy.injected["truncate"] > 0
    assert proxy.object_gets == pieces + proxy.injected["truncate"]  # each faulted piece read once more


def test_an_unreadable_container_is_one_error_row(packed_bucket, s3_server):
    """A shard failing every read is one row naming it; a shard that is not a tar is one row too."""
    s3fs.S3FileSystem(endpoint_url=s3_server["endpoint"], skip_instance_cache=True).pipe_file(
        "faults/broken/shard-00000.tar", b"not a tar" * 100)
    never = "faults/shards/shard-00003.tar"
    with FaultProxy(s3_server["endpoint"], always={never: "internal"}) as proxy:
        rows = _read_packed("webdataset", proxy.endpoint)
    errors = {uri: error for uri, _, error in rows if error}
    assert errors == {f"s3://{never}": "read failed after 5 attempts: InternalError (HTTP 500): We encountered an "
                                       "internal error. Please try again."}
    assert len(rows) == len(packed_bucket["webdataset"]["uris"]) - 8 + 1 and proxy.attempts[never] == 5
    loc = resolve("s3://faults/broken", s3_server["endpoint"])
    batch = {"path": np.array(["faults/broken/shard-00000.tar"], dtype=object), "size": np.array([900]),
             "problem": np.full(1, None), "problem_kind": np.full(1, None)}
    [out] = _read_containers(batch, loc, "webdataset")
    assert list(out["uri"]) == ["s3://faults/broken/shard-00000.tar"] and list(out["error_kind"]) == ["read"]
    assert out["error"][0].startswith("not a readable WebDataset shard: ReadError")


@pytest.mark.parametrize("fault", ["slowdown", "internal", "reset", "truncate"])
@pytest.mark.parametrize("fmt", ["webdataset", "parquet"])
def test_job_reads_packed_inputs_under_faults(fmt, fault, packed_bucket, s3_server, packed_clean, tmp_path):
    packed = packed_bucket[fmt]
    n, reads = len(packed["uris"]), _CONTAINERS + (fmt == "parquet")  # + the footer the driver reads
    with FaultProxy(s3_server["endpoint"], fault, rate=RATE, seed=SEED) as proxy:
        start = time.perf_counter()
        rows, stats = _moderate(tmp_path / "out", proxy.endpoint, input=packed["url"])
        wall = time.perf_counter() - start
    errors = _check_rows(rows, packed, packed_clean[fmt])
    _record(f"{fault}, {fmt} ({_CONTAINERS} files of {n // _CONTAINERS} samples; GETs are of files)", RATE, proxy, n,
            len(rows), len(errors), wall, retries=proxy.object_gets - reads)
    assert proxy.injected[fault] > 0, proxy.summary()
    assert not errors and stats["images"] == n and stats["errors"] == 0
    assert proxy.object_gets == reads + proxy.injected[fault]  # every faulted read was read again, once
    assert proxy.client_retries["GET"] == 0  # by the fetch layer, counted: not by botocore


@pytest.mark.parametrize("fault", ["slowdown", "internal", "reset"])
def test_job_writes_every_output_object_once_under_faults(fault, photo_bucket, s3_server, clean_run, out_bucket):
    """The output on the flaky store, every PUT at risk: run.json, the flags files, stats.parquet and
    _SUCCESS each arrive once and whole, and the flags are those of a run without faults."""
    out, n = f"faults-out/job-{fault}", len(photo_bucket["uris"])

    def ours(key: str) -> bool:  # what the run writes through the fetch layer (the output lease has its own rules)
        return key.endswith((".parquet", "/run.json", f"/{SUCCESS}"))

    with FaultProxy(s3_server["endpoint"], fault, rate=RATE, seed=SEED, methods=("PUT",), only=ours) as proxy:
        start = time.perf_counter()
        stats = run_moderation(ModerationConfig(input=photo_bucket["url"], output=f"s3://{out}",
                                                s3_endpoint=proxy.endpoint, rows_per_file=8, **_JOB))
        wall = time.perf_counter() - start
    out_bucket.invalidate_cache()
    written = sorted(out_bucket.find(out))
    flags = [p for p in written if p.startswith(f"{out}/flags/") and p.endswith(".parquet")]
    assert written == sorted([f"{out}/{SUCCESS}", f"{out}/run.json", f"{out}/stats.parquet", *flags])
    puts = {k: v for k, v in proxy.puts.items() if ours(k)}
    assert sorted(puts) == written  # every object there was PUT by the run, and no other file of ours
    rows = [r for f in flags for r in pq.read_table(f, filesystem=out_bucket).to_pylist()]  # each file whole
    errors = _check_rows(rows, photo_bucket, clean_run)
    assert pq.read_table(f"{out}/stats.parquet", filesystem=out_bucket).to_pylist()[0]["images"] == n
    retries = sum(puts.values()) - len(puts)
    _record(f"{fault} on writes ({sum(puts.values())} PUTs: run.json, {len(flags)} flags files, "
            "stats.parquet, _SUCCESS)", RATE, proxy, n, len(rows), len(errors), wall, retries=retries)
    assert not errors and stats["images"] == n and len(flags) >= 4
    assert proxy.injected[fault] > 0 and retries == proxy.injected[fault], proxy.summary()
    assert proxy.client_retries["PUT"] == 0  # retried by put, counted: not by botocore


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
