"""``ngt-ray submit`` and the job-life verbs against a real two-node Ray cluster and S3 server on loopback."""

from __future__ import annotations

import json
import re
import time

import pyarrow.parquet as pq
import pytest
import s3fs
from conftest import S3_ACCESS_KEY, S3_SECRET_KEY

from ngt_ray.cli import main

_CLASSES, _PER_CLASS = ("revolver", "Faces", "Leopards", "Motorbikes"), 3


@pytest.fixture
def cluster(ray_head_cluster, monkeypatch):
    """The cluster, with its token where an operator would set it for ngt-ray."""
    monkeypatch.setenv("RAY_AUTH_TOKEN", ray_head_cluster["token"])
    return ray_head_cluster


@pytest.fixture(scope="module")
def bucket(caltech, s3_server) -> dict:
    """Twelve real photos, three of each of four classes, in a bucket of the loopback S3 server."""
    photos = [p for folder in _CLASSES
              for p in [q for q in sorted((caltech / "train" / folder).glob("*.jpg")) if q.stat().st_size][:_PER_CLASS]]
    fs = s3fs.S3FileSystem(endpoint_url=s3_server["endpoint"])
    fs.mkdir("submit-in")
    fs.mkdir("submit-out")
    keys = [f"submit-in/photos/{p.parent.name}-{p.name}" for p in photos]  # the classes share file names
    fs.put([str(p) for p in photos], keys)
    assert len(fs.ls("submit-in/photos")) == _PER_CLASS * len(_CLASSES)
    return {"fs": fs, "endpoint": s3_server["endpoint"], "input": "s3://submit-in/photos",
            "uris": {f"s3://{key}" for key in keys}}


def _submitted_id(out: str) -> str:
    return re.search(r"^submitted \w+ as (\S+)$", out, re.MULTILINE).group(1)


def _client(cluster):
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(cluster["address"], headers={"Authorization": f"Bearer {cluster['token']}"})


def _nodes_that_ran(cluster, job_id: str) -> set[str]:
    """The nodes where the job's tasks ran, from Ray's state API."""
    from ray.util.state import StateApiClient
    from ray.util.state.common import ListApiOptions, StateResource

    state = StateApiClient(address=cluster["address"], headers={"Authorization": f"Bearer {cluster['token']}"})
    options = ListApiOptions(filters=[("job_id", "=", job_id)], limit=10_000, detail=True)
    return {t.node_id for t in state.list(StateResource.TASKS, options=options, raise_on_missing_output=False)
            if t.node_id and t.state == "FINISHED"}


def test_submitted_moderation_flags_every_image_once_on_both_nodes(cluster, bucket, capsys):
    output = "s3://submit-out/run"
    code = main(["submit", "--address", cluster["address"], "moderate", "--input", bucket["input"],
                 "--output", output, "--s3-endpoint", bucket["endpoint"],
                 "--no-measure-time"])  # the stage timing costs half a minute on this machine
    out, err = capsys.readouterr()
    assert code == 0, out + err
    job_id = _submitted_id(out)
    assert f"dashboard: {cluster['address']}/#/jobs/{job_id}" in out
    assert f"flags: {output}/flags/   stats: {output}/stats.parquet" in out
    # the job's own summary, followed to its end
    assert re.search(rf"^{len(bucket['uris'])} images, 0 errors", out, re.MULTILINE) and f"{job_id}: SUCCEEDED" in out
    assert bucket["fs"].exists("submit-out/run/stats.parquet")

    flags = pq.read_table("submit-out/run/flags", filesystem=bucket["fs"])
    uris = flags.column("uri").to_pylist()
    assert len(uris) == len(set(uris)) and set(uris) == bucket["uris"]  # every input exactly once

    info = _client(cluster).get_job_info(job_id)
    # the keys stayed here: the nodes read S3 with their own environment, as with an identity
    assert "AWS_SECRET_ACCESS_KEY" in err and "stay here" in err
    shown = json.dumps([info.entrypoint, info.runtime_env, info.metadata])
    assert S3_SECRET_KEY not in shown and S3_ACCESS_KEY not in shown and "env_vars" not in shown
    assert info.entrypoint.startswith("python -m ngt_ray.cli moderate ")
    assert _nodes_that_ran(cluster, info.job_id) == set(cluster["nodes"])  # Ray Data spread the work


def test_a_job_is_listed_stopped_and_its_logs_read(cluster, bucket, capsys):
    at = ["--address", cluster["address"]]
    job_id = "ngt-life-1"
    code = main(["submit", *at, "--no-wait", "--submission-id", job_id, "moderate", "--input", bucket["input"],
                 "--output", "s3://submit-out/stopped", "--s3-endpoint", bucket["endpoint"]])
    out = capsys.readouterr().out
    assert code == 0 and f"ngt-ray logs {job_id} --follow --address {cluster['address']}" in out

    client, deadline = _client(cluster), time.monotonic() + 60
    while str(client.get_job_status(job_id)) == "PENDING" and time.monotonic() < deadline:
        time.sleep(0.2)
    assert main(["status", job_id, *at]) == 0
    assert re.search(rf"^{job_id}: (RUNNING|PENDING) \(started ", capsys.readouterr().out, re.MULTILINE)
    assert main(["list", *at]) == 0
    assert re.search(rf"^{job_id} +(RUNNING|PENDING) .* python -m ngt_ray.cli moderate ", capsys.readouterr().out,
                     re.MULTILINE)

    assert main(["stop", job_id, *at]) == 0
    assert capsys.readouterr().out == f"{job_id}: STOPPED\n"
    assert main(["status", job_id, *at]) == 0 and f"{job_id}: STOPPED" in capsys.readouterr().out
    assert main(["logs", job_id, "--follow", *at]) == 0 and f"{job_id}: STOPPED" in capsys.readouterr().err
    assert main(["logs", job_id, *at]) == 0
    assert main(["stop", job_id, *at]) == 0 and "(it had already ended)" in capsys.readouterr().out

    # the same id again, and an id the cluster never saw
    assert main(["submit", *at, "--submission-id", job_id, "moderate", "--input", bucket["input"],
                 "--output", "s3://submit-out/again"]) == 2
    assert "refused the job" in capsys.readouterr().err
    assert main(["status", "no-such-job", *at]) == 2
    assert "no job no-such-job at" in capsys.readouterr().err


def test_the_cluster_token_is_found_where_ray_looks_and_refusals_say_what_to_set(cluster, monkeypatch, tmp_path,
                                                                              capsys):
    at = ["--address", cluster["address"]]
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.ray/auth_token
    monkeypatch.delenv("RAY_AUTH_TOKEN")
    assert main(["list", *at]) == 2
    assert "none was found: set RAY_AUTH_TOKEN" in capsys.readouterr().err

    monkeypatch.setenv("RAY_AUTH_TOKEN", "not-the-token")
    assert main(["list", *at]) == 2
    assert "refused the auth token from $RAY_AUTH_TOKEN" in capsys.readouterr().err

    monkeypatch.delenv("RAY_AUTH_TOKEN")
    (tmp_path / "token").write_text(cluster["token"] + "\n")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "token"))
    assert main(["list", *at]) == 0


def test_an_unreachable_address_fails_fast_naming_it(capsys):
    from conftest import _free_port

    address = f"http://127.0.0.1:{_free_port()}"
    started = time.monotonic()
    assert main(["list", "--address", address]) == 2
    err = capsys.readouterr().err
    assert time.monotonic() - started < 5
    assert f"no Ray dashboard answers at {address}" in err and "ray start --head" in err and "port-forward" in err


def test_without_an_address_it_says_where_to_give_one(monkeypatch, capsys):
    for name in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"):
        monkeypatch.delenv(name, raising=False)
    assert main(["status", "x"]) == 2 and "pass --address" in capsys.readouterr().err


def _project(root, big: int = 0):
    """A checkout with one file of ``big`` bytes (sparse: no disk is used) beside the package."""
    (root / "ngt_ray" / "checkpoints").mkdir(parents=True)
    (root / "pyproject.toml").write_text('[project]\ndependencies = ["ray[data]==2.60.0", "torch==2.14.1"]\n')
    (root / "ngt_ray" / "checkpoints" / "model.pt").write_bytes(b"weights")
    (root / "ngt_ray" / "stale.pt").write_bytes(b"x")
    (root / "manifest.csv").write_text("uri,label\n")
    (root / "weights").mkdir()
    with (root / "weights" / "huge.bin").open("wb") as f:
        f.truncate(big)
    return root


def test_a_working_dir_over_the_upload_limit_fails_before_any_upload_naming_the_biggest_files(tmp_path, capsys):
    from conftest import _free_port

    from ngt_ray.cluster.package import upload_limit

    assert upload_limit() == 100 * 2**20  # the dashboard's request limit, under the GCS's 512 MiB
    root = _project(tmp_path / "checkout", big=upload_limit() + 1)
    closed = f"http://127.0.0.1:{_free_port()}"
    submit = ["submit", "--address", closed, "--working-dir", str(root), "moderate", "--input", "s3://in/photos",
              "--output", "s3://out/run"]
    assert main(submit) == 2
    err = capsys.readouterr().err
    assert "over Ray's upload limit of 100 MiB" in err and "weights/huge.bin (100.0 MiB)" in err
    assert "no Ray dashboard" not in err  # refused before reaching for the cluster

    (root / ".rayignore").write_text("/weights/\n")  # what Ray will leave out does not count
    assert main(submit) == 2 and "no Ray dashboard answers" in capsys.readouterr().err


def test_the_package_is_the_project_and_its_checkpoints_without_environment_caches_or_data(tmp_path):
    from ngt_ray.cluster.package import packaged_files, pip_pins, runtime_env

    root = _project(tmp_path)
    (root / ".venv" / "lib").mkdir(parents=True)
    (root / ".venv" / "lib" / "x.py").write_text("")
    (root / "ngt_ray" / "__pycache__").mkdir()
    (root / "ngt_ray" / "__pycache__" / "x.pyc").write_bytes(b"")
    (root / "docs" / "evaluation").mkdir(parents=True)
    (root / "docs" / "evaluation" / "grid.parquet").write_bytes(b"")
    (root / "docs" / "results.md").write_text("")
    files = {str(path.relative_to(root)) for path, _ in packaged_files(root)}
    assert files == {"pyproject.toml", "ngt_ray/checkpoints/model.pt", "weights/huge.bin", "docs/results.md"}

    env = runtime_env(root, None, pip=True)
    assert env["working_dir"] == str(root) and ".venv" in env["excludes"] and "env_vars" not in env
    assert env["pip"] == pip_pins(root) == ["torch==2.14.1"]  # the cluster runs Ray already
    assert runtime_env(None, "ngt-ray:latest", pip=False) == {}  # the image holds the project


@pytest.mark.parametrize(("argv", "says"), [
    (["demo"], "'demo' cannot be submitted (it builds its bucket on this machine"),
    (["compress", "--model", "m", "--output", "o"], "'compress' cannot be submitted"),
    (["frobnicate"], "'frobnicate' cannot be submitted (it is no verb that runs on a cluster)"),
    ([], "name the verb to run on the cluster, one of moderate, train, evaluate, benchmark"),
    (["moderate", "--input", "s3://in/p", "--output", "results"], "--output results would resolve inside the "
                                                                  "job's temporary copy of the project"),
])
def test_what_cannot_run_on_a_cluster_is_refused_saying_why(argv, says, capsys):
    assert main(["submit", "--address", "http://127.0.0.1:9", *argv]) == 2
    assert says in capsys.readouterr().err


def test_the_verbs_arguments_are_parsed_here_before_anything_is_sent(capsys):
    with pytest.raises(SystemExit):
        main(["submit", "--address", "http://127.0.0.1:9", "moderate", "--input", "s3://in/p", "--output", "s3://o",
              "--grup-size", "4"])
    assert "unrecognized arguments: --grup-size" in capsys.readouterr().err


def test_the_entrypoint_runs_the_clusters_interpreter_with_every_argument_quoted():
    from ngt_ray.cluster.submit import entrypoint

    assert entrypoint("python", "moderate", ["--input", "s3://b/a folder", "--output", "s3://b/o;rm"]) == \
        "python -m ngt_ray.cli moderate --input 's3://b/a folder' --output 's3://b/o;rm'"
