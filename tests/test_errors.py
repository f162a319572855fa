"""A bad invocation, or an input or output that cannot be used, is told in one line with no
traceback, exits 2 (usage) or 1 (a failed run), and writes nothing: the real ``ngt-ray`` in a
subprocess, over real photos, a real loopback S3 server and real file permissions."""

from __future__ import annotations

import ctypes
import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest
import s3fs

from ngt_ray.job.fetch import BucketError

CLI = Path(sys.executable).with_name("ngt-ray")
FAST = ["--stub-models", "--no-measure-time"]


def _drop_root_overrides() -> None:
    """In the child, before exec: a root process loses CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH from
    its bounding set, so file permissions bind it as they bind a user (PR_CAPBSET_DROP)."""
    libc = ctypes.CDLL(None, use_errno=True)
    for capability in (1, 2):
        if libc.prctl(24, capability, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


def ngt_ray(*args: str, env: dict[str, str | None] | None = None, bound_by_permissions: bool = False,
            timeout: float = 300) -> subprocess.CompletedProcess:
    """The CLI with ``args``, this environment changed by ``env`` (None: unset); with
    ``bound_by_permissions``, file permissions bind it even when the tests run as root."""
    preexec = _drop_root_overrides if bound_by_permissions and os.geteuid() == 0 else None
    # a Ray of its own: never one that another test or process on this machine started
    changed = {**os.environ, "AWS_EC2_METADATA_DISABLED": "true", "RAY_ADDRESS": "local", **(env or {})}
    return subprocess.run([str(CLI), *args], capture_output=True, text=True, timeout=timeout, preexec_fn=preexec,
                          env={name: value for name, value in changed.items() if value is not None})


def assert_refused(done: subprocess.CompletedProcess, code: int, *says: str) -> str:
    """Exit ``code``; at most 3 lines on stderr, no traceback, and the lines name the problem."""
    err = done.stderr
    assert done.returncode == code, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    assert len(err.strip().splitlines()) <= 3, err
    for text in says:
        assert text in err, err
    return err


def _files(root: Path) -> dict[str, int]:
    """Every entry under ``root``, with its size (-1: a folder)."""
    return {str(p.relative_to(root)): -1 if p.is_dir() else p.stat().st_size for p in root.rglob("*")}


def moderate(planted, out: Path | str, *more: str, **kw) -> subprocess.CompletedProcess:
    return ngt_ray("moderate", "--input", str(planted.root), "--output", str(out), *FAST, *more, **kw)


# --- the input --------------------------------------------------------------------------------


def test_an_input_that_does_not_exist(planted, tmp_path):
    out = tmp_path / "out"
    done = ngt_ray("moderate", "--input", str(tmp_path / "no-such-folder"), "--output", str(out), *FAST)
    assert_refused(done, 1, f"the input {tmp_path / 'no-such-folder'} does not exist", "check --input")
    assert not out.exists()


@pytest.mark.parametrize("layout", [[], ["a/", "a/b/"]], ids=["empty", "only-empty-subfolders"])
def test_an_input_with_no_files(planted, tmp_path, layout):
    empty, out = tmp_path / "empty", tmp_path / "out"
    empty.mkdir()
    for folder in layout:
        (empty / folder).mkdir()
    done = ngt_ray("moderate", "--input", str(empty), "--output", str(out), *FAST)
    assert_refused(done, 1, f"the input folder {empty} holds no files", "nothing to moderate")
    assert not out.exists()


def test_an_input_folder_that_cannot_be_read(planted, tmp_path):
    unreadable, out = tmp_path / "unreadable", tmp_path / "out"
    unreadable.mkdir()
    (unreadable / "a.jpg").write_bytes(next(planted.root.iterdir()).read_bytes())
    unreadable.chmod(0)
    try:
        done = ngt_ray("moderate", "--input", str(unreadable), "--output", str(out), *FAST,
                       bound_by_permissions=True)
    finally:
        unreadable.chmod(0o755)
    assert_refused(done, 1, f"the input folder {unreadable} cannot be read (Permission denied)")
    assert not out.exists()


def test_a_missing_manifest_and_one_of_an_unknown_form(planted, tmp_path):
    out = tmp_path / "out"
    done = moderate(planted, out, "--input-manifest", str(tmp_path / "keys.parquet"))
    assert_refused(done, 1, f"the input manifest {tmp_path / 'keys.parquet'} does not exist")
    (tmp_path / "keys.txt").write_text("a.jpg\n")
    done = moderate(planted, out, "--input-manifest", str(tmp_path / "keys.txt"))
    assert_refused(done, 2, "--input-manifest must be a .parquet or .csv file of keys")
    assert not out.exists()


# --- options ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("option", "value", "says"), [
    ("--group-size", "-3", "argument --group-size: group size must be a positive integer"),
    ("--group-size", "0", "argument --group-size: group size must be a positive integer"),
    ("--group-size", "lots", "argument --group-size"),
    ("--batch-size", "0", "batch size must be at least 1 (--batch-size), got 0"),
    ("--batch-size", "many", "argument --batch-size: invalid int value"),
    ("--min-size", "0", "--min-size must be at least 1, got 0"),
    ("--prevalence-prior", "0", "--prevalence-prior must be a share between 0 and 1"),
    ("--prevalence-prior", "1.5", "--prevalence-prior must be a share between 0 and 1"),
    ("--rows-per-file", "0", "--rows-per-file must be at least 1"),
    ("--max-actors", "0", "--max-actors must be at least 1"),
    ("--actors-per-gpu", "0", "--actors-per-gpu must be at least 1"),
    ("--actor-start-timeout", "0", "--actor-start-timeout must be a positive number of seconds"),
    ("--actor-start-timeout", "nan", "--actor-start-timeout must be a positive number of seconds"),
    ("--seed", "-1", "--seed must be 0 or more"),
    ("--design", "magic", "argument --design: invalid choice: 'magic'"),
    ("--grup-size", "4", "unrecognized arguments: --grup-size"),
])
def test_a_bad_option_value_is_a_usage_error(planted, tmp_path, option, value, says):
    done = moderate(planted, tmp_path / "out", option, value)
    assert_refused(done, 2, says)
    assert not (tmp_path / "out").exists()


def test_a_missing_required_option_names_it_in_two_lines(planted, tmp_path):
    done = ngt_ray("moderate", "--input", str(planted.root))
    err = assert_refused(done, 2, "the following arguments are required: --output", "ngt-ray moderate --help")
    assert len(err.strip().splitlines()) == 2  # not argparse's twenty lines of usage


@pytest.mark.parametrize("option", ["--model", "--individual-model"])
def test_an_unknown_model_is_a_usage_error_naming_the_packaged_ones(planted, tmp_path, option):
    done = moderate(planted, tmp_path / "out", option, "no-such-model")
    assert_refused(done, 2, f"{option} 'no-such-model' names no model", "revolver-lite0-individual")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("url", "says"), [
    ("", "--input is empty"),
    ("foo://bucket/photos", "--input foo://bucket/photos: Protocol not known: foo"),
    ("s3://", "--input s3:// names no bucket"),
])
def test_an_input_url_that_names_no_place(planted, tmp_path, url, says):
    done = ngt_ray("moderate", "--input", url, "--output", str(tmp_path / "out"), *FAST)
    assert_refused(done, 2, says)
    assert not (tmp_path / "out").exists()


# --- input and output apart -------------------------------------------------------------------


def test_an_output_inside_the_input_or_the_input_itself_is_refused(planted, tmp_path):
    bucket = tmp_path / "bucket"
    bucket.mkdir()
    for photo in sorted(planted.root.iterdir())[:3]:
        (bucket / photo.name).write_bytes(photo.read_bytes())
    before = _files(bucket)
    done = ngt_ray("moderate", "--input", str(bucket), "--output", str(bucket / "results"), *FAST)
    assert_refused(done, 2, f"--output {bucket / 'results'} is inside --input {bucket}")
    done = ngt_ray("moderate", "--input", str(bucket), "--output", f"{bucket}/", *FAST)
    assert_refused(done, 2, "is the input itself")
    (tmp_path / "link").symlink_to(bucket)  # the same folder by another name
    done = ngt_ray("moderate", "--input", str(bucket), "--output", str(tmp_path / "link" / "results"), *FAST)
    assert_refused(done, 2, "is inside --input")
    assert _files(bucket) == before  # nothing written among the photos


def test_an_input_inside_the_output_is_refused(planted, tmp_path):
    out = tmp_path / "out"
    (out / "photos").mkdir(parents=True)
    for photo in sorted(planted.root.iterdir())[:3]:
        (out / "photos" / photo.name).write_bytes(photo.read_bytes())
    before = _files(out)
    done = ngt_ray("moderate", "--input", str(out / "photos"), "--output", str(out), *FAST)
    assert_refused(done, 2, f"--input {out / 'photos'} is inside --output {out}", "sibling folder")
    assert _files(out) == before


# --- the output -------------------------------------------------------------------------------


def test_an_output_that_is_a_file_or_lies_under_one(planted, tmp_path):
    taken = tmp_path / "taken"
    taken.write_text("someone's notes")
    done = moderate(planted, taken)
    assert_refused(done, 1, f"the output {taken} is a file, not a folder")
    done = moderate(planted, taken / "results")
    assert_refused(done, 1, f"the output folder {taken / 'results'} cannot be created: {taken} is a file")
    assert taken.read_text() == "someone's notes"


@pytest.mark.parametrize(("mode", "where", "says"), [
    (0o500, ".", "cannot be written (permission denied)"),
    (0o000, ".", "cannot be read or written (permission denied)"),
    (0o500, "new/results", "cannot be created: no permission to write in"),
])
def test_an_output_folder_without_permission(planted, tmp_path, mode, where, says):
    folder = tmp_path / "out"
    folder.mkdir()
    (folder / "notes.txt").write_text("kept")
    out = (folder / where).resolve() if where == "." else folder / where
    folder.chmod(mode)
    try:
        done = moderate(planted, out, bound_by_permissions=True)
    finally:
        folder.chmod(0o755)
    assert_refused(done, 1, says)
    assert _files(folder) == {"notes.txt": 4}


@pytest.mark.skipif(not Path("/sys").is_dir(), reason="needs Linux's /sys")
def test_an_output_on_a_filesystem_that_takes_no_new_folder(planted):
    out = Path("/sys/ngt-ray-errors-test/results")
    done = moderate(planted, out)
    assert_refused(done, 1, "/sys/ngt-ray-errors-test")
    assert not out.parent.exists()


def test_an_output_that_holds_flags_no_run_recorded_is_left_as_it_was(planted, tmp_path):
    out = tmp_path / "out"
    (out / "flags").mkdir(parents=True)
    (out / "flags" / "theirs.parquet").write_bytes(b"a user's file")
    before = _files(out)
    done = moderate(planted, out)
    assert_refused(done, 2, "holds flags that no ngt-ray run recorded", "--overwrite")
    assert _files(out) == before


def test_a_config_no_node_can_hold_leaves_no_output_folder(planted, tmp_path):
    out = tmp_path / "new" / "out"
    done = moderate(planted, out, "--batch-size", "100000000")
    assert_refused(done, 2, "a decode task of 100000000 images needs", "smaller --batch-size")
    assert not (tmp_path / "new").exists()


# --- what was not foreseen --------------------------------------------------------------------


def test_an_unexpected_error_is_one_line_and_debug_shows_its_traceback(planted, tmp_path):
    (tmp_path / "broken.json").write_text("{}")  # a model card with nothing on it
    (tmp_path / "broken.pt").write_bytes(b"")
    out = tmp_path / "out"
    done = moderate(planted, out, "--model", str(tmp_path / "broken"))
    assert_refused(done, 1, "ngt-ray moderate: unexpected error: TypeError: ",
                   "; run again with --debug for the traceback")
    assert not out.exists()


def test_debug_adds_the_traceback_and_keeps_the_exit_code_and_verbose_does_not(planted, tmp_path):
    missing = ["moderate", "--input", str(tmp_path / "missing"), "--output", str(tmp_path / "out"), *FAST]
    for args in (["--debug", *missing], [*missing, "--debug"]):
        done = ngt_ray(*args)
        assert done.returncode == 1 and "Traceback" in done.stderr and "LocationError" in done.stderr
        assert done.stderr.strip().splitlines()[-1].startswith("ngt-ray moderate: the input ")
    assert_refused(ngt_ray("-v", *missing), 1, "does not exist")


def test_a_storage_error_raised_in_a_ray_task_is_told_in_its_own_words(ray_local):
    import ray.data

    from ngt_ray.cli import _failure

    def refuse(batch):
        raise BucketError("cannot read the input: AccessDenied (HTTP 403)\non every object")

    with pytest.raises(Exception) as raised:  # Ray's RayTaskError(UserCodeException): the original only as text
        ray.data.range(2).map_batches(refuse).materialize()
    assert _failure(raised.value) == (1, "cannot read the input: AccessDenied (HTTP 403)")


@pytest.mark.parametrize(("number", "says"), [
    (errno.ENOSPC, "No space left on device: /data/out/run.json; the disk is full"),
    (errno.EDQUOT, "Disk quota exceeded: /data/out/run.json; a disk quota is exhausted"),
    (errno.EROFS, "Read-only file system: /data/out/run.json; the filesystem is read-only"),
])
def test_a_full_disk_or_quota_met_while_writing_is_told_with_the_file(number, says):
    from ngt_ray.cli import _failure

    error = OSError(number, os.strerror(number), "/data/out/run.json")
    code, message = _failure(error)
    assert code == 1 and message.startswith(says)


# --- S3 ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def s3(s3_server, planted):
    fs = s3fs.S3FileSystem(endpoint_url=s3_server["endpoint"])
    for bucket in ("errors-in", "errors-empty", "errors-out"):
        fs.mkdir(bucket)
    fs.put([str(p) for p in sorted(planted.root.iterdir())[:3]], "errors-in/photos/")
    return {"endpoint": s3_server["endpoint"], "root": Path(s3_server["root"])}


def s3_moderate(s3, source: str, out: str, *more: str, **kw) -> subprocess.CompletedProcess:
    return ngt_ray("moderate", "--input", source, "--output", out, "--s3-endpoint", s3["endpoint"], *FAST, *more, **kw)


_NO_CREDENTIALS = {"AWS_ACCESS_KEY_ID": None, "AWS_SECRET_ACCESS_KEY": None, "AWS_SESSION_TOKEN": None,
                   "AWS_PROFILE": None, "AWS_SHARED_CREDENTIALS_FILE": os.devnull, "AWS_CONFIG_FILE": os.devnull}


@pytest.mark.parametrize(("source", "out", "env", "code", "says"), [
    ("s3://no-such-bucket/photos", "s3://errors-out/run", {}, 1,
     "input bucket 'no-such-bucket' does not exist"),
    ("s3://errors-in/nothing-here", "s3://errors-out/run", {}, 1,
     "no objects under the input s3://errors-in/nothing-here (the prefix is empty or does not exist)"),
    ("s3://errors-empty", "s3://errors-out/run", {}, 1, "no objects under the input s3://errors-empty"),
    ("s3://errors-in/photos", "s3://no-such-out/run", {}, 1,
     "output bucket 'no-such-out' does not exist (or is not visible with these credentials); create it first"),
    ("s3://errors-in/photos", "s3://errors-out/run", {"AWS_SECRET_ACCESS_KEY": "not-the-secret"}, 1,
     "the store refused the credentials for the input s3://errors-in/photos: SignatureDoesNotMatch"),
    ("s3://errors-in/photos", "s3://errors-out/run", {"AWS_ACCESS_KEY_ID": "nobody-we-know"}, 1,
     "the store refused the credentials for the input s3://errors-in/photos: InvalidAccessKeyId"),
    ("s3://errors-in/photos", "s3://errors-out/run", _NO_CREDENTIALS, 1,
     "no S3 credentials found for the input s3://errors-in/photos: set AWS_ACCESS_KEY_ID"),
    ("s3://errors-in/photos", "s3://errors-in/photos/run", {}, 2,
     "--output s3://errors-in/photos/run is inside --input s3://errors-in/photos"),
    ("s3://errors-in", "s3://errors-in/photos/run", {}, 2, "is inside --input s3://errors-in"),
    ("s3://Not_A_Bucket!/photos", "s3://errors-out/run", {}, 2, "invalid bucket name 'Not_A_Bucket!'"),
], ids=["no-input-bucket", "empty-prefix", "empty-bucket", "no-output-bucket", "wrong-secret", "unknown-key",
        "no-credentials", "output-in-input", "output-in-input-bucket", "invalid-bucket-name"])
def test_s3_inputs_and_outputs_that_cannot_be_used(s3, source, out, env, code, says):
    before = _files(s3["root"])
    done = s3_moderate(s3, source, out, env=env)
    assert_refused(done, code, says)
    assert _files(s3["root"]) == before  # no bucket, no object, no lease written anywhere


def test_s3_output_credentials_are_checked_before_a_local_input_is_read(s3, planted):
    before = _files(s3["root"])
    done = ngt_ray("moderate", "--input", str(planted.root), "--output", "s3://errors-out/run", "--s3-endpoint",
                   s3["endpoint"], *FAST, env={"AWS_SECRET_ACCESS_KEY": "not-the-secret"})
    assert_refused(done, 1, "the store refused the credentials for the output s3://errors-out/run")
    assert _files(s3["root"]) == before


def test_s3_endpoint_unreachable_or_not_a_url(s3):
    from conftest import _free_port

    closed = f"http://127.0.0.1:{_free_port()}"
    done = ngt_ray("moderate", "--input", "s3://errors-in/photos", "--output", "s3://errors-out/run",
                   "--s3-endpoint", closed, *FAST)
    assert_refused(done, 1, "cannot reach the store of the input s3://errors-in/photos: cannot connect to "
                            f"{closed.removeprefix('http://')}", "check --s3-endpoint")
    done = ngt_ray("moderate", "--input", "s3://errors-in/photos", "--output", "s3://errors-out/run",
                   "--s3-endpoint", "not a url", *FAST)
    assert_refused(done, 2, "--s3-endpoint 'not a url' is not a URL")


def test_s3_a_transient_failure_of_the_check_is_asked_again_and_then_told(s3):
    from faultproxy import FaultProxy

    key = "errors-in/photos/" + sorted(Path(s3["root"], "errors-in", "photos").iterdir())[0].name
    with FaultProxy(s3["endpoint"], always={key: "slowdown"}, methods=("HEAD",)) as proxy:
        done = ngt_ray("moderate", "--input", f"s3://{key}", "--output", "s3://errors-out/run", "--s3-endpoint",
                       proxy.endpoint, *FAST)
    # a HEAD's answer has no body: the status is all there is to name
    assert_refused(done, 1, f"the store kept failing to answer about the input s3://{key}: 503 (HTTP 503)")
    assert proxy.requests["HEAD"] == 5  # as many attempts as a read gets
