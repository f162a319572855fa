"""One writer per output (``ngt_ray.job.lease``): a second run into an output refuses in one line
naming the holder, or waits and resumes; a killed holder's lease blocks the output until it expires
and is then taken over by one run; every object is in flags/ exactly once, and stats agree.

On a local disk and on S3. The S3 tests use moto's server (``moto_s3``), which honours conditional
writes as AWS does; ``rclone serve s3`` (``s3_server``) ignores them, shown here, and gets the
create-then-verify fallback.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import boto3
import botocore.exceptions
import pyarrow.parquet as pq
import pytest
from processes import kill_once

from ngt_ray.job.lease import (
    LEASE,
    TTL_ENV,
    Holder,
    LeaseError,
    LeaseLost,
    OutputLease,
    _store_for,
    honours_conditional_writes,
    lease_ttl,
)
from ngt_ray.job.outputs import SUCCESS
from ngt_ray.storage import Location, resolve

CLI = Path(sys.executable).with_name("ngt-ray")


# ---- where an output lives: a local folder, or a fresh bucket on moto's S3 ----

def _s3_output(endpoint: str) -> Location:
    bucket = f"lease-{uuid.uuid4().hex[:10]}"
    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=bucket)
    return resolve(f"s3://{bucket}/out", endpoint)


def _lease_holder(root: Location) -> Holder | None:
    root.fs.invalidate_cache()
    path = root.join(LEASE).path
    return Holder.parse(root.fs.cat_file(path)) if root.fs.exists(path) else None


def _names(root: Location) -> list[str]:
    root.fs.invalidate_cache()
    if not root.fs.exists(root.path):
        return []
    return sorted(p.rsplit("/", 1)[-1] for p in root.fs.ls(root.path, detail=False))


def _expired_lease(root: Location, pid: int = 999_999) -> Holder:
    """What a run killed long ago leaves: a lease whose ``expires`` has passed."""
    now = time.time()
    dead = Holder("a-dead-host", pid, "killedrun000", now - 120, now - 90, now - 30, 60.0)
    if "file" in root.fs.protocol:
        root.fs.makedirs(root.path, exist_ok=True)
    root.fs.pipe_file(root.join(LEASE).path, dead.to_json())
    return dead


# ---- the lease alone (no Ray) ----

def _check_exclusive_and_refusal(root: Location) -> None:
    store = _store_for(root.join(LEASE), settle=0.2)  # the conditional create itself: a second one fails
    version = store.create(b"one")
    assert version is not None and store.create(b"two") is None and store.read() == (b"one", version)
    assert store.replace(b"three", "not-its-version") is None and not store.delete("not-its-version")
    assert store.delete(version) and store.read() is None

    first = OutputLease(ttl=30).acquire(root)
    try:
        holder = _lease_holder(root)
        assert holder is not None and holder.id == first.holder.id and holder.pid == os.getpid()
        assert holder.expires == pytest.approx(holder.renewed + 30)
        before = _names(root)
        with pytest.raises(LeaseError) as refused:
            OutputLease(ttl=30).acquire(root)
        message = str(refused.value)
        assert "\n" not in message
        for part in (f"host {holder.host}", f"pid {holder.pid}", holder.run, "since", "expires", "--wait-for-lease"):
            assert part in message, (part, message)
        assert _names(root) == before and _lease_holder(root) == holder  # the refused run wrote nothing
    finally:
        first.release()
    assert LEASE not in _names(root)  # released: deleted
    second = OutputLease(ttl=30).acquire(root)  # and free to take
    second.release()


def _check_renewal_and_release(root: Location) -> None:
    lease = OutputLease(ttl=1.2).acquire(root)
    try:
        first = _lease_holder(root)
        time.sleep(2.5)  # past the first expiry: renewed every 0.4 s, so still held
        renewed = _lease_holder(root)
        assert renewed is not None and renewed.run == first.run and renewed.started == first.started
        assert renewed.expires > first.expires + 1 and renewed.expires > time.time()
        with pytest.raises(LeaseError, match=first.run):
            OutputLease(ttl=1.2).acquire(root)
        lease.check()
    finally:
        lease.release()
    assert LEASE not in _names(root)


def _check_race(root: Location, racers: int = 6, expired: bool = True) -> None:
    """``racers`` runs start together on a free output, or on one whose holder's lease has expired
    (``expired``): exactly one takes it, and the others name that one."""
    dead = _expired_lease(root) if expired else None
    start = threading.Barrier(racers)
    won: list[OutputLease] = []
    refused: list[str] = []

    def race() -> None:
        lease = OutputLease(ttl=30)
        start.wait()
        try:
            won.append(lease.acquire(root))
        except LeaseError as exc:
            refused.append(str(exc))

    threads = [threading.Thread(target=race) for _ in range(racers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    try:
        assert len(won) == 1 and len(refused) == racers - 1, (len(won), refused)
        winner = won[0].holder
        assert _lease_holder(root).id == winner.id
        assert dead is None or winner.id != dead.id
        assert all(winner.run in message for message in refused)  # the losers name the winner
    finally:
        for lease in won:
            lease.release()


def _check_release_only_by_holder(root: Location) -> None:
    lease = OutputLease(ttl=30).acquire(root)
    lease._stop.set()  # no renewal from here on: another run takes the lease over as if it had expired
    thief = Holder("another-host", 4242, "thiefrun0000", time.time(), time.time(), time.time() + 30, 30.0)
    root.fs.pipe_file(root.join(LEASE).path, thief.to_json())
    with pytest.raises(LeaseLost, match="thiefrun0000"):
        lease.check()
    lease.release()
    assert _lease_holder(root).id == thief.id  # a lost lease is not deleted from under its new holder
    root.fs.rm(root.join(LEASE).path)


def test_a_lease_is_created_exclusively_and_a_second_run_is_refused_in_one_line_naming_the_holder(tmp_path):
    _check_exclusive_and_refusal(resolve(str(tmp_path / "out")))


def test_a_held_lease_is_renewed_and_released_only_by_its_holder(tmp_path):
    root = resolve(str(tmp_path / "out"))
    _check_renewal_and_release(root)
    _check_release_only_by_holder(root)


def test_of_runs_racing_for_a_free_or_an_expired_lease_exactly_one_takes_it(tmp_path):
    root = resolve(str(tmp_path / "out"))
    for expired in (False, True, False, True):
        _check_race(root, expired=expired)


def test_a_waiting_run_takes_the_lease_once_the_holder_releases_it(tmp_path):
    root = resolve(str(tmp_path / "out"))
    holder = OutputLease(ttl=30).acquire(root)
    taken: list[float] = []

    def wait() -> None:
        OutputLease(ttl=30, wait=True).acquire(root).release()
        taken.append(time.time())

    waiter = threading.Thread(target=wait)
    waiter.start()
    time.sleep(1.5)
    assert not taken and _lease_holder(root).id == holder.holder.id  # it waits while the holder lives
    released = time.time()
    holder.release()
    waiter.join(timeout=30)
    assert taken and taken[0] >= released


def test_a_run_that_loses_its_lease_is_stopped_with_lease_lost(tmp_path):
    """The renewer finds another holder and interrupts the run's (main) thread: LeaseLost, not a
    KeyboardInterrupt, and the new holder's lease stays."""
    root = resolve(str(tmp_path / "out"))
    thief = Holder("another-host", 4242, "thiefrun0000", time.time(), time.time(), time.time() + 30, 30.0)
    with pytest.raises(LeaseLost, match=r"lost the lease .*thiefrun0000.*run again to resume"):  # noqa: SIM117
        with OutputLease(ttl=0.9) as lease:
            lease.acquire(root)
            (tmp_path / "out" / LEASE).write_bytes(thief.to_json())
            taken = time.monotonic()
            time.sleep(30)  # the run's work: interrupted within a renewal period (0.3 s)
    assert time.monotonic() - taken < 5  # stopped where it was, not when its work was done
    assert _lease_holder(root).id == thief.id


def test_an_unreadable_lease_never_blocks_an_output_and_the_ttl_comes_from_the_environment(tmp_path, monkeypatch):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / LEASE).write_bytes(b"")  # e.g. written by hand
    assert Holder.parse(b"").expires == 0
    lease = OutputLease(ttl=30).acquire(resolve(str(tmp_path / "out")))
    lease.release()
    monkeypatch.setenv(TTL_ENV, "7.5")
    assert lease_ttl() == 7.5 and OutputLease().ttl == 7.5
    monkeypatch.setenv(TTL_ENV, "soon")
    with pytest.raises(ValueError, match=TTL_ENV):
        lease_ttl()


# ---- S3: conditional writes (moto), and a store that ignores them (rclone) ----

def test_on_s3_the_lease_is_taken_renewed_taken_over_and_released_with_conditional_writes(moto_s3):
    root = _s3_output(moto_s3["endpoint"])
    assert honours_conditional_writes(root.fs, root.join(LEASE).path)
    assert _names(root) == []  # the probe wrote nothing
    _check_exclusive_and_refusal(root)
    _check_renewal_and_release(root)
    _check_release_only_by_holder(root)
    for expired in (False, True):
        _check_race(root, expired=expired)


def _conditional_puts(endpoint: str, bucket: str) -> list[str]:
    """Two PutObjects with If-None-Match: * to one key: what each returned."""
    s3 = boto3.client("s3", endpoint_url=endpoint)
    s3.create_bucket(Bucket=bucket)
    answers = []
    for body in (b"first", b"second"):
        try:
            s3.put_object(Bucket=bucket, Key="k", Body=body, IfNoneMatch="*")
            answers.append("200")
        except botocore.exceptions.ClientError as exc:
            answers.append(exc.response["Error"]["Code"])
    return answers


def test_rclone_ignores_conditional_writes_where_moto_honours_them_and_the_lease_falls_back(s3_server, moto_s3):
    assert _conditional_puts(moto_s3["endpoint"], "cond-moto") == ["200", "PreconditionFailed"]
    assert _conditional_puts(s3_server["endpoint"], "cond-rclone") == ["200", "200"]  # overwritten: ignored

    boto3.client("s3", endpoint_url=s3_server["endpoint"]).create_bucket(Bucket="lease-rclone")
    root = resolve("s3://lease-rclone/out", s3_server["endpoint"])
    assert not honours_conditional_writes(root.fs, root.join(LEASE).path)
    assert _names(root) == []  # the probe object was removed
    _check_exclusive_and_refusal(root)  # create-then-verify still keeps a second run out
    _check_race(root, racers=3)


# ---- the real CLI: two runs into one output, and a holder killed with SIGKILL ----

@pytest.fixture(params=["disk", "s3"])
def output(request, tmp_path) -> tuple[Location, list[str]]:
    """An output location and the CLI options that reach it."""
    if request.param == "disk":
        return resolve(str(tmp_path / "out")), []
    endpoint = request.getfixturevalue("moto_s3")["endpoint"]
    root = _s3_output(endpoint)
    return root, ["--s3-endpoint", endpoint]


def _moderate(planted, root: Location, extra: list[str], address: str, *options: str,
              ttl: float | None = None) -> subprocess.Popen:
    env = dict(os.environ)
    if ttl is not None:
        env[TTL_ENV] = str(ttl)
    return subprocess.Popen([str(CLI), "moderate", "--input", str(planted.root), "--output", root.url, "--stub-models",
                             "--no-measure-time", "--ray-address", address, *extra, *options],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)


def _finish(procs: list[subprocess.Popen], timeout: float = 600) -> list[tuple[int, str, str, float]]:
    """Each process's (exit code, stdout, stderr, when it ended)."""
    ended: dict[int, float] = {}
    deadline = time.monotonic() + timeout
    while len(ended) < len(procs):
        for i, p in enumerate(procs):
            if i not in ended and p.poll() is not None:
                ended[i] = time.time()
        if time.monotonic() > deadline:
            for p in procs:
                if p.poll() is None:
                    os.killpg(p.pid, signal.SIGKILL)
            pytest.fail("a run did not finish in time")
        time.sleep(0.1)
    return [(p.returncode, p.stdout.read(), p.stderr.read(), ended[i]) for i, p in enumerate(procs)]


def _check_every_object_once(root: Location, planted) -> None:
    root.fs.invalidate_cache()
    flags = root.join("flags")
    uris = pq.read_table(flags.path, columns=["uri"], filesystem=flags.arrow_fs).column("uri").to_pylist()
    expected = {resolve(str(planted.root)).uri(str(p)) for p in planted.root.iterdir()}
    assert len(uris) == len(set(uris)) == planted.count and set(uris) == expected  # one row per object
    stats = pq.read_table(root.join("stats.parquet").path, filesystem=root.arrow_fs).to_pylist()[0]
    assert stats["images"] == len(uris) == planted.count  # the stats describe exactly those rows
    assert _names(root) == sorted([SUCCESS, "flags", "run.json", "stats.parquet"])  # the lease went


def test_two_runs_started_together_write_every_object_once(ray_local, planted, output):
    root, extra = output
    address = ray_local.get_runtime_context().gcs_address

    runs = [_moderate(planted, root, extra, address) for _ in range(2)]
    results = _finish(runs)
    codes = sorted(r[0] for r in results)
    assert codes == [0, 2], [(r[0], r[2][-2000:]) for r in results]
    (winner, loser) = (runs[0], runs[1]) if results[0][0] == 0 else (runs[1], runs[0])
    refusal = results[runs.index(loser)][2]
    assert refusal.count("\n") == 1 and refusal.startswith("ngt-ray moderate: "), refusal  # one line
    assert f"pid {winner.pid}" in refusal and "since" in refusal and "expires" in refusal, refusal
    _check_every_object_once(root, planted)

    # again from scratch, both waiting for the lease: the second runs after the first, writing nothing new
    root.fs.rm(root.path, recursive=True)
    runs = [_moderate(planted, root, extra, address, "--wait-for-lease") for _ in range(2)]
    results = _finish(runs)
    assert [r[0] for r in results] == [0, 0], [r[2][-2000:] for r in results]
    first, second = sorted(results, key=lambda r: r[3])
    assert "waiting for its lease" in second[2] and "waiting for its lease" not in first[2]
    assert f"({planted.count} kept from an earlier attempt)" in second[1]  # it resumed: nothing redone
    _check_every_object_once(root, planted)


def test_a_killed_holders_lease_blocks_the_output_until_it_expires_then_one_run_takes_over(ray_local, planted,
                                                                                            output):
    root, extra = output
    address = ray_local.get_runtime_context().gcs_address
    ttl = 15.0
    small = ["--batch-size", "4", "--group-size", "4", "--rows-per-file", "4"]  # many files: killed mid-run
    killed = _moderate(planted, root, extra, address, *small, ttl=ttl)
    flags = root.join("flags")

    def some_flags() -> bool:
        root.fs.invalidate_cache()
        return root.fs.exists(flags.path) and bool(root.fs.find(flags.path))

    kill_once(killed, some_flags)  # kill -9 once it writes flags, before it is done
    assert SUCCESS not in _names(root)
    dead = _lease_holder(root)
    assert dead is not None and dead.pid == killed.pid and dead.expires > time.time()  # left behind, still live

    with pytest.raises(LeaseError, match=f"pid {killed.pid}"):  # refused while it is live
        OutputLease(ttl=ttl).acquire(root)
    waiting = _moderate(planted, root, extra, address, *small, "--wait-for-lease", ttl=ttl)
    [(code, out, err, _)] = _finish([waiting])
    assert code == 0, err[-3000:]
    assert "taking over the expired lease" in err and f"pid {killed.pid}" in err
    # nothing was written before the dead run's lease expired: run.json is the takeover's
    root.fs.invalidate_cache()
    modified = root.fs.modified(root.join("run.json").path).timestamp()
    assert modified >= int(dead.expires), (modified, dead.expires)
    assert json.loads(root.fs.cat_file(root.join("run.json").path))["stub_models"] is True
    _check_every_object_once(root, planted)
