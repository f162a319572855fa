"""What a moderation run checks before Ray starts or a byte is written: the options, the input and
the output. A bad invocation then fails in a second with one line, and leaves no output folder,
no ``run.json``, nothing behind (``RunOutput.open`` writes ``run.json`` as soon as it claims the
output, and the input is only listed after that).

Two kinds of refusal, which the CLI tells apart by their exit code:

- :class:`UsageError` (exit 2): options that cannot run as given: a value out of range, a model
  that does not exist, a URL that names no bucket or an unknown protocol, an output that overlaps
  the input.
- :class:`~ngt_ray.job.fetch.StorageError` (exit 1): storage that cannot be used as it is: an
  input that does not exist or holds no object, an output folder that cannot be written, a bucket
  that does not exist, credentials missing or refused, a store that cannot be reached
  (:class:`LocationError`, ``BucketError``, ``StorageUnavailable``).

Input and output may not overlap, in either direction. An output inside the input (or the same
place) would have the run list its own ``flags/``, ``run.json`` and stats as objects to moderate,
and more of them on every re-run. An input inside the output is refused too: the output belongs
to ngt-ray (``--overwrite`` replaces what is there, a staged run moves folders inside it), so
photos kept there could be listed beside the results or removed with them. Sibling folders
(``.../uploads/`` and ``.../moderation/run-1/``) are the way.

The checks are cheap on a bucket of a billion objects: on S3 one LIST of at most one key (and a
HEAD where the input may be one object), on a local folder a walk that stops at the first file;
never the listing the run makes itself.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import re
import time
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any

from ngt_ray.job.fetch import (
    TRANSIENT,
    UNREACHABLE,
    BucketError,
    RetryPolicy,
    StorageError,
    StorageUnavailable,
    classify,
    clean,
    exception_chain,
    single_attempt_client,
)
from ngt_ray.nets.checkpoint import get_model, list_models
from ngt_ray.storage import Location, redact, resolve

__all__ = ["LocationError", "UsageError", "check_run", "check_values", "no_new_folder_on_failure"]

# S3 error codes that mean the credentials, not the bucket, are wrong
_CREDENTIAL_CODES = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken", "ExpiredToken",
                     "TokenRefreshRequired"}
_NO_CREDENTIALS = {"NoCredentialsError", "PartialCredentialsError", "CredentialRetrievalError"}
_DENIED_CODES = {"AccessDenied", "403", "AllAccessDisabled", "AccountProblem"}
_RETRY = RetryPolicy()  # a probe asks again after a transient failure as a read would
_NEVER_CREATED = "; create it first: ngt-ray never creates buckets, so a typo cannot make a new one"


class UsageError(ValueError):
    """Options that cannot run as given (the CLI exits 2)."""


class LocationError(StorageError):
    """An input or output that cannot be used: missing, empty, unreadable, not writable (the CLI exits 1)."""


def check_values(cfg: Any) -> None:
    """The numbers of a ``ModerationConfig``: sizes, counts, the prior, the seed."""
    positive = [("batch size must be at least 1 (--batch-size)", cfg.batch_size),
                ("--min-size must be at least 1", cfg.min_size),
                ("--rows-per-file must be at least 1", cfg.rows_per_file),
                ("--max-actors must be at least 1", cfg.max_actors),
                ("--actors-per-gpu must be at least 1", cfg.actors_per_gpu)]
    for what, value in positive:
        if value is not None and value < 1:
            raise UsageError(f"{what}, got {value}")
    if not 0 < cfg.prevalence_prior < 1:
        raise UsageError(f"--prevalence-prior must be a share between 0 and 1 (0.01 is 1 %), "
                         f"got {cfg.prevalence_prior}")
    if not (cfg.actor_start_timeout > 0 and math.isfinite(cfg.actor_start_timeout)):
        raise UsageError(f"--actor-start-timeout must be a positive number of seconds, got {cfg.actor_start_timeout}")
    if cfg.seed < 0:
        raise UsageError(f"--seed must be 0 or more, got {cfg.seed}")


def check_run(cfg: Any) -> None:
    """Everything a run of ``cfg`` can be refused for before it starts (see the module's rules);
    raises :class:`UsageError` or a ``StorageError``."""
    check_values(cfg)
    _check_models(cfg)
    source = _location(cfg.input, "--input", cfg.s3_endpoint)
    out = _location(cfg.output, "--output", cfg.s3_endpoint)
    _check_apart(source, out)
    if cfg.input_manifest:
        _check_manifest(_location(cfg.input_manifest, "--input-manifest", cfg.s3_endpoint))
        if _is_s3(source):  # nothing is listed: only the bucket is checked
            _s3_holds(source, "input", "--input")
    else:
        _check_input(source)
    _check_output(out)


@contextlib.contextmanager
def no_new_folder_on_failure(cfg: Any) -> Iterator[None]:
    """On a failure inside, remove the local folders made on the way to ``cfg.output`` since entering
    (the output lease makes its folder before the run is planned) while they are still empty: a run
    refused before it wrote anything leaves no folder behind. A folder with anything in it stays."""
    output = resolve(cfg.output, cfg.s3_endpoint)
    made: list[str] = []  # the deepest first
    path = output.path if _is_local(output) else "/"
    while not os.path.exists(path):
        made.append(path)
        path = os.path.dirname(path)
    try:
        yield
    except BaseException:
        for folder in made:
            try:
                os.rmdir(folder)
            except OSError:  # not empty (or gone): what is in it was written on purpose
                break
        raise


def _check_models(cfg: Any) -> None:
    for flag, name in (("--model", cfg.model), ("--individual-model", cfg.individual_model)):
        if not name:
            continue
        try:
            stem = get_model(name)
        except FileNotFoundError:
            raise UsageError(f"{flag} {name!r} names no model: give a checkpoint stem (<stem>.json beside <stem>.pt) "
                             f"or a packaged model ({', '.join(list_models())})") from None
        weights = Path(stem).with_suffix(".pt")
        if not cfg.stub_models and not weights.exists():
            raise UsageError(f"{flag} {name!r}: its card is there but not its weights ({weights})")


def _location(url: str, flag: str, s3_endpoint: str | None) -> Location:
    if not url or not url.strip():
        raise UsageError(f"{flag} is empty: give a folder or a URL such as s3://bucket/prefix")
    try:
        loc = resolve(url, s3_endpoint)
    except ValueError as exc:  # fsspec: "Protocol not known: foo"
        raise UsageError(f"{flag} {redact(url)}: {clean(str(exc))} (give a folder, an s3:// URL or another fsspec "
                         "protocol's)") from exc
    except ImportError as exc:  # a protocol whose filesystem is not installed (gs:// without gcsfs)
        raise LocationError(f"{flag} {redact(url)}: {clean(str(exc))}") from exc
    if _is_s3(loc) and not loc.path.split("/", 1)[0]:
        raise UsageError(f"{flag} {redact(url)} names no bucket: give s3://bucket/prefix")
    return loc


def _is_s3(loc: Location) -> bool:
    return "s3" in loc.fs.protocol


def _is_local(loc: Location) -> bool:
    return "file" in loc.fs.protocol


def _within(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def _place(loc: Location) -> tuple[str, str]:
    """The store and the path in it, comparable across the input and the output (local paths with
    their symlinks resolved)."""
    if _is_local(loc):
        return "file", os.path.realpath(loc.path)
    store = f"{loc.fs.protocol}|{loc.fs.storage_options.get('endpoint_url')}"
    return store, loc.path.rstrip("/")


def _check_apart(source: Location, out: Location) -> None:
    (store_in, path_in), (store_out, path_out) = _place(source), _place(out)
    if store_in != store_out:
        return
    if _within(path_out, path_in):
        where = "is the input itself" if path_out == path_in else f"is inside --input {redact(source.url)}"
        raise UsageError(f"--output {redact(out.url)} {where}: the run would list its own results as images; "
                         "choose an --output outside the input (a sibling folder)")
    if _within(path_in, path_out):
        raise UsageError(f"--input {redact(source.url)} is inside --output {redact(out.url)}, which ngt-ray owns "
                         "(--overwrite replaces what is there); keep the photos outside it (a sibling folder)")


def _check_input(loc: Location) -> None:
    url = redact(loc.url)
    if _is_local(loc):
        _check_local_input(loc.path, url)
    elif _is_s3(loc):
        if not _s3_holds(loc, "input", "--input"):
            raise LocationError(f"no objects under the input {url} (the prefix is empty or does not exist): nothing "
                                "to moderate; check --input")
    else:
        try:
            found = loc.fs.exists(loc.path) and (loc.fs.isfile(loc.path) or any(
                files for _, _, files in loc.fs.walk(loc.path, on_error="raise")))
        except Exception as exc:
            raise LocationError(f"cannot read the input {url}: {clean(str(exc))}") from exc
        if not found:
            raise LocationError(f"no objects under the input {url}: nothing to moderate; check --input")


def _check_local_input(path: str, url: str) -> None:
    """``path`` exists and holds an object: a file, or a folder with an entry that is no folder
    somewhere below it (a subfolder that cannot be listed counts: the run gives it an error row)."""
    if not os.path.exists(path):
        raise LocationError(f"the input {url} does not exist: check --input")
    if not os.path.isdir(path):
        return
    folders = [path]
    while folders:
        folder = folders.pop()
        try:
            with os.scandir(folder) as entries:
                for entry in entries:
                    if not entry.is_dir(follow_symlinks=False):
                        return
                    folders.append(entry.path)
        except OSError as exc:
            if folder != path:
                return
            raise LocationError(f"the input folder {url} cannot be read ({exc.strerror}): check its "
                                "permissions") from exc
    raise LocationError(f"the input folder {url} holds no files: nothing to moderate; check --input")


def _check_manifest(manifest: Location) -> None:
    url, name = redact(manifest.url), PurePosixPath(manifest.path).name
    # the forms ngt_ray.job.manifests reads (a folder is read as Parquet files): a usage error comes first
    if not (name == "manifest.json" or name.endswith((".csv", ".csv.gz", ".parquet")) or _is_folder(manifest)):
        raise UsageError(f"--input-manifest must be a .parquet or .csv file of keys, or an S3 Inventory "
                         f"manifest.json; got {url}")
    if _is_local(manifest):
        exists = os.path.exists(manifest.path)
    elif _is_s3(manifest):
        exists = _s3_holds(manifest, "input manifest", "--input-manifest")
    else:
        exists = True  # read as it is: its filesystem's error says why not
    if not exists:
        raise LocationError(f"the input manifest {url} does not exist: check --input-manifest")


def _is_folder(loc: Location) -> bool:
    try:
        return bool(loc.fs.isdir(loc.path))
    except Exception:  # noqa: BLE001 - a store that cannot say: the existence check below tells why
        return False


def _check_output(loc: Location) -> None:
    url = redact(loc.url)
    if _is_s3(loc):
        _s3_holds(loc, "output", "--output", hint=_NEVER_CREATED)
        return
    if not _is_local(loc):
        return  # RunOutput.open checks the bucket of any other object store
    path = loc.path
    if os.path.exists(path):
        if not os.path.isdir(path):
            raise LocationError(f"the output {url} is a file, not a folder: choose another --output")
        cannot = [what for what, mode in (("read", os.R_OK | os.X_OK), ("written", os.W_OK | os.X_OK))
                  if not os.access(path, mode)]
        if cannot:
            raise LocationError(f"the output folder {url} cannot be {' or '.join(cannot)} (permission denied): "
                                "choose another --output, or fix its permissions")
        return
    parent = os.path.dirname(path)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise LocationError(f"the output folder {url} cannot be created: {parent} is a file")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise LocationError(f"the output folder {url} cannot be created: no permission to write in {parent}; "
                            "choose another --output")


def _s3_holds(loc: Location, role: str, flag: str, hint: str = "") -> bool:
    """Whether ``loc`` is an object or a prefix with objects under it: one LIST of one key, and a
    HEAD when that finds none. A transient failure (SlowDown, 5xx, a reset) is asked again, as
    ``fetch`` would; every refusal of the store is raised at once, named for ``role``."""
    client = single_attempt_client(loc.fs)  # a store that cannot be reached fails now, not after retries
    bucket, _, key = loc.path.partition("/")
    rng = random.Random()
    for attempt in range(1, _RETRY.attempts + 1):
        try:
            listed = client.call_s3("list_objects_v2", Bucket=bucket, Prefix=f"{key}/" if key else "", MaxKeys=1)
            if listed.get("Contents"):
                return True
            if not key:
                return False
            try:
                client.call_s3("head_object", Bucket=bucket, Key=key)
            except FileNotFoundError:
                return False
            return True
        except Exception as exc:
            if attempt < _RETRY.attempts and classify(exc)[0] == TRANSIENT:
                time.sleep(_RETRY.backoff(attempt, rng))
                continue
            raise _refusal(exc, loc, role, flag, hint) from exc
    raise AssertionError("unreachable")  # every attempt returns or raises


def _refusal(exc: BaseException, loc: Location, role: str, flag: str, hint: str) -> Exception:
    """The error, in one line, for a store's refusal to list ``loc``."""
    url, bucket = redact(loc.url), loc.path.split("/", 1)[0]
    chain = exception_chain(exc)
    names = {type(e).__name__ for e in chain}
    if names & _NO_CREDENTIALS:
        return BucketError(f"no S3 credentials found for the {role} {url}: set AWS_ACCESS_KEY_ID and "
                           "AWS_SECRET_ACCESS_KEY (or AWS_PROFILE), or run where a role provides them")
    if "ParamValidationError" in names:  # botocore's own check of the request, before it is sent
        bad = re.search(r'Invalid bucket name "([^"]*)"', str(exc))
        return UsageError(f"{flag} {url}: invalid bucket name {bad[1]!r}: give s3://bucket/prefix" if bad else
                          f"{flag} {url}: {clean(str(chain[-1]), 160)}")
    if any(isinstance(e, ValueError) and "Invalid endpoint" in str(e) for e in chain):
        return UsageError(f"--s3-endpoint {loc.fs.storage_options.get('endpoint_url')!r} is not a URL: give one "
                          "such as http://minio:9000")
    kind, code, reason = classify(exc)
    if code == "NoSuchBucket":
        return BucketError(f"{role} bucket {bucket!r} does not exist (or is not visible with these "
                           f"credentials){hint}")
    if code in _CREDENTIAL_CODES:
        return BucketError(f"the store refused the credentials for the {role} {url}: {reason}; check "
                           "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or the profile or role in use)")
    if code in _DENIED_CODES:
        return BucketError(f"access to the {role} {url} is denied ({reason}): the credentials in use may not "
                           "list it; check the bucket's policy or the role")
    if kind == UNREACHABLE:
        return StorageUnavailable(f"cannot reach the store of the {role} {url}: {reason}; check --s3-endpoint "
                                  "(or AWS_ENDPOINT_URL) and the network")
    if kind == TRANSIENT:
        return StorageUnavailable(f"the store kept failing to answer about the {role} {url}: {reason}; try "
                                  "again later")
    return LocationError(f"cannot list the {role} {url}: {reason}")
