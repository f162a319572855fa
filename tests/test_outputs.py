"""An output location belongs to one run configuration, resumes after an interruption without
duplicates, is never half-presented, and never creates a bucket; inputs can come from a manifest."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import boto3
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from processes import kill_once

from ngt_ray.job.fetch import BucketError
from ngt_ray.job.outputs import SUCCESS, OutputError, RunOutput, run_config
from ngt_ray.job.pipeline import ModerationConfig, run_moderation
from ngt_ray.storage import resolve
from ngt_ray.tools.demo import build_bucket


def _flag_uris(output: Path) -> list[str]:
    return pq.read_table(output / "flags", columns=["uri"]).column("uri").to_pylist()


def _bucket_uris(bucket: Path) -> set[str]:
    loc = resolve(str(bucket))
    return {loc.uri(str(p)) for p in bucket.iterdir()}


@pytest.fixture(scope="module")
def big_bucket(caltech, tmp_path_factory) -> Path:
    """96 held-out photos: enough model batches on 2 cores to interrupt a run halfway."""
    return build_bucket(caltech, tmp_path_factory.mktemp("resume") / "bucket", prevalence=0.05, max_images=92).root


def test_a_run_killed_halfway_resumes_with_every_object_exactly_once_and_no_work_redone(ray_local, big_bucket,
                                                                                        tmp_path):
    out = tmp_path / "out"
    options = ["--input", str(big_bucket), "--output", str(out), "--batch-size", "8", "--group-size", "8",
               "--rows-per-file", "8", "--no-measure-time"]
    address = ray_local.get_runtime_context().gcs_address
    # a short lease (ngt_ray.job.lease): the killed driver's blocks the output for seconds, not a minute
    driver = subprocess.Popen([sys.executable, "-m", "ngt_ray.cli", "moderate", *options, "--ray-address", address],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True,
                              env={**os.environ, "NGT_RAY_LEASE_TTL": "5"})
    # kill the driver (-9) once some flags are written, long before all of them are
    kill_once(driver, lambda: any((out / "flags").glob("*.parquet")))
    assert not (out / SUCCESS).exists() and not (out / "stats.parquet").exists()  # not presented as complete
    time.sleep(2)  # the killed job's actors wind down

    stats = run_moderation(ModerationConfig(input=str(big_bucket), output=str(out), batch_size=8, group_size=8,
                                            measure_time=False, wait_for_lease=True))  # till the kill's expires
    uris = _flag_uris(out)
    listed = _bucket_uris(big_bucket)
    print(f"\nresume: {stats['resumed_rows']} of {len(listed)} rows kept from the killed run, "
          f"{len(listed) - stats['resumed_rows']} written by the re-run")
    assert len(uris) == len(set(uris)) == len(listed) and set(uris) == listed  # every object exactly once
    assert 0 < stats["resumed_rows"] < len(listed)  # the killed run's finished work was not redone
    assert stats["images"] == len(listed)  # stats describe every row, not just the re-run's
    assert (out / SUCCESS).exists() and json.loads((out / "run.json").read_text())["group_size"] == "8"


def test_an_output_belongs_to_one_configuration_and_is_replaced_only_once_complete(ray_local, planted, tmp_path):
    out = tmp_path / "out"
    base = {"input": str(planted.root), "output": str(out), "stub_models": True, "measure_time": False,
            "group_size": 4}
    first = run_moderation(ModerationConfig(**base))
    assert first["images"] == planted.count and (out / SUCCESS).exists()
    before = sorted((out / "flags").iterdir())

    with pytest.raises(OutputError, match=r"another configuration \(.*seed: 0 -> 1") as refused:
        run_moderation(ModerationConfig(**base, seed=1))
    assert "--overwrite" in str(refused.value)
    assert sorted((out / "flags").iterdir()) == before and (out / SUCCESS).exists()  # nothing touched

    again = run_moderation(ModerationConfig(**base))  # same config, complete: nothing to redo
    assert again["resumed_rows"] == planted.count and sorted((out / "flags").iterdir()) == before

    replaced = run_moderation(ModerationConfig(**base, seed=1, overwrite=True))
    assert replaced["images"] == planted.count and replaced["resumed_rows"] == 0
    assert json.loads((out / "run.json").read_text())["seed"] == 1
    assert not set(before) & set((out / "flags").iterdir())  # the old files went, once the new were complete
    assert sorted(p.name for p in out.iterdir()) == [SUCCESS, "flags", "run.json", "stats.parquet"]
    assert sorted(_flag_uris(out)) == sorted(_bucket_uris(planted.root))


def test_flags_no_run_recorded_and_files_cut_short_are_handled(ray_local, planted, tmp_path):
    foreign = tmp_path / "foreign"
    (foreign / "flags").mkdir(parents=True)
    (foreign / "flags" / "mine.parquet").write_bytes(b"a user's file")
    cfg = ModerationConfig(input=str(planted.root), output=str(foreign), stub_models=True, measure_time=False)
    with pytest.raises(OutputError, match="no ngt-ray run recorded"):
        run_moderation(cfg)
    assert (foreign / "flags" / "mine.parquet").exists()

    # an interrupted attempt of this config left a file with no footer: removed, its rows redone
    out = tmp_path / "out"
    RunOutput.open(str(out), run_config(cfg))
    (out / "flags" / "cut.parquet").write_bytes(b"PAR1 half a file")
    stats = run_moderation(ModerationConfig(input=str(planted.root), output=str(out), stub_models=True,
                                            measure_time=False))
    assert stats["images"] == planted.count and not (out / "flags" / "cut.parquet").exists()


def test_a_missing_output_bucket_is_an_error_and_is_not_created(s3_server):
    s3 = boto3.client("s3", endpoint_url=s3_server["endpoint"])
    with pytest.raises(OutputError, match="output bucket 'no-such-bukcet' does not exist"):
        RunOutput.open("s3://no-such-bukcet/results", {"seed": 0}, s3_server["endpoint"])
    assert "no-such-bukcet" not in {b["Name"] for b in s3.list_buckets()["Buckets"]}


def test_inputs_named_by_a_manifest_or_an_s3_inventory_are_read_by_key(ray_local, planted, s3_server, tmp_path):
    s3 = boto3.client("s3", endpoint_url=s3_server["endpoint"])
    for bucket in ("manifest-in", "manifest-out", "inventory"):
        s3.create_bucket(Bucket=bucket)
    names = sorted(p.name for p in planted.root.iterdir())
    for name in names:
        s3.put_object(Bucket="manifest-in", Key=f"photos/{name}", Body=(planted.root / name).read_bytes())
    chosen = names[::2]  # the manifest names half of the bucket: the rest must not be read
    keys = pa.table({"key": chosen})
    sink = pa.BufferOutputStream()
    pq.write_table(keys, sink)
    s3.put_object(Bucket="manifest-in", Key="keys.parquet", Body=sink.getvalue().to_pybytes())
    # an S3 Inventory report: gzipped CSV without a header, URL-encoded keys, listed by manifest.json
    rows = "".join(f'"manifest-in","photos/{n}","123"\n' for n in chosen)
    s3.put_object(Bucket="inventory", Key="inv/data/part-0.csv.gz", Body=gzip.compress(rows.encode()))
    s3.put_object(Bucket="inventory", Key="inv/manifest.json", Body=json.dumps({
        "sourceBucket": "manifest-in", "destinationBucket": "arn:aws:s3:::inventory", "fileFormat": "CSV",
        "fileSchema": "Bucket, Key, Size", "files": [{"key": "inv/data/part-0.csv.gz", "size": 1}]}).encode())

    common = {"input": "s3://manifest-in/photos", "s3_endpoint": s3_server["endpoint"], "stub_models": True,
              "measure_time": False}
    timings = {}
    for name, manifest in [("listed", None), ("parquet", "s3://manifest-in/keys.parquet"),
                           ("inventory", "s3://inventory/inv/manifest.json")]:
        stats = run_moderation(ModerationConfig(**common, output=f"s3://manifest-out/{name}", input_manifest=manifest))
        written = resolve(f"s3://manifest-out/{name}/flags", s3_server["endpoint"])
        flags = pq.read_table(written.path, filesystem=written.arrow_fs).column("uri")
        expected = names if manifest is None else chosen
        assert sorted(flags.to_pylist()) == [f"s3://manifest-in/photos/{n}" for n in expected]
        assert stats["images"] == len(expected) and stats["errors"] == 0
        timings[name] = stats["seconds_to_first_output"]
    print("\nseconds to the first flagged row: " + ", ".join(f"{k} {v:.2f}" for k, v in timings.items()))
    assert all(v > 0 for v in timings.values())

    with pytest.raises(BucketError, match="input bucket 'no-such-input' does not exist"):
        run_moderation(ModerationConfig(**{**common, "input": "s3://no-such-input/photos"},
                                        output="s3://manifest-out/nobucket", input_manifest="s3://manifest-in/keys.parquet"))
    with pytest.raises(ValueError, match="must be a .parquet or .csv file of keys"):
        run_moderation(ModerationConfig(**common, output="s3://manifest-out/bad", input_manifest="s3://x/keys.txt"))


def test_the_cli_says_what_refused_in_one_line(ray_local, planted, tmp_path, capsys):
    from ngt_ray.cli import main

    (tmp_path / "out" / "flags").mkdir(parents=True)
    (tmp_path / "out" / "flags" / "theirs.parquet").write_bytes(b"a user's file")
    code = main(["moderate", "--input", str(planted.root), "--output", str(tmp_path / "out"), "--stub-models"])
    err = capsys.readouterr().err
    assert code == 2 and "no ngt-ray run recorded" in err and "Traceback" not in err
