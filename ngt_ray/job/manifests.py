"""Inputs named by a manifest instead of a listing: a Parquet/CSV of keys, or an S3 Inventory report.

Listing 100M objects before the first read is hours of dead time on the driver. A manifest is
read by Ray tasks like any other data, so the first objects are fetched while the rest of the
manifest is still being read, and the driver never holds the keys.

Keys may be full URLs (``s3://bucket/a.jpg``) or paths relative to ``--input``. S3 Inventory
(``.../manifest.json``) lists its data files, whose rows name a bucket and a key in it; CSV
inventories have no header (the columns are in the manifest's ``fileSchema``) and URL-encode keys.
"""

from __future__ import annotations

import json
from pathlib import PurePosixPath
from typing import Any
from urllib.parse import unquote_plus

import numpy as np
import pyarrow.csv as pacsv
import ray.data

from ngt_ray.job.sources import pick_column
from ngt_ray.storage import Location, resolve

__all__ = ["manifest_paths"]

_KEY_COLUMNS = ("uri", "url", "key", "path", "Key")


def _inventory(manifest: Location) -> tuple[list[str], str, list[str] | None]:
    """Data files, their format and (for CSV) column names of an S3 Inventory ``manifest.json``."""
    with manifest.fs.open(manifest.path) as f:
        report: dict[str, Any] = json.load(f)
    try:
        bucket = report["destinationBucket"].rsplit(":", 1)[-1]
        files = [f"{bucket}/{entry['key']}" for entry in report["files"]]
        fmt = report["fileFormat"].lower()
    except (KeyError, TypeError) as exc:
        raise ValueError(f"{manifest.url} is not an S3 Inventory manifest (missing {exc})") from None
    names = [name.strip() for name in report.get("fileSchema", "").split(",")] if fmt == "csv" else None
    if fmt not in ("csv", "parquet"):
        raise ValueError(f"S3 Inventory format {report['fileFormat']!r} is not supported (use CSV or Parquet)")
    return files, fmt, names


def _to_paths(batch: dict[str, np.ndarray], key: str, base: Location, bucket: str | None) -> dict[str, np.ndarray]:
    """Object paths on ``base``'s filesystem. Inventory rows name their bucket and a URL-encoded key;
    other keys are full URLs or relative to ``base``."""
    paths = []
    for i, value in enumerate(batch[key]):
        value = str(value)
        if bucket:
            paths.append(f"{batch[bucket][i]}/{unquote_plus(value)}")
        elif "://" in value:
            paths.append(base.fs._strip_protocol(value))
        else:
            paths.append(f"{base.path.rstrip('/')}/{value}")
    return {"path": np.array(paths, dtype=object)}


def manifest_paths(manifest_url: str, base: Location, *, key_column: str | None = None,
                   s3_endpoint: str | None = None, task_cpus: float = 1.0) -> ray.data.Dataset:
    """A lazy Dataset of ``{"path": ...}`` rows, one per key in the manifest, paths on ``base``'s
    filesystem (keys that are not full URLs are relative to ``base``)."""
    manifest = resolve(manifest_url, s3_endpoint)
    tasks = {"num_cpus": task_cpus}
    name = PurePosixPath(manifest.path).name
    bucket = None  # the column naming each key's bucket (S3 Inventory)
    if name == "manifest.json":
        files, fmt, names = _inventory(manifest)
        if fmt == "csv":
            ds = ray.data.read_csv(files, filesystem=manifest.arrow_fs, num_cpus=task_cpus,
                                   read_options=pacsv.ReadOptions(column_names=names),
                                   convert_options=pacsv.ConvertOptions(column_types={n: "string" for n in names}))
            key, bucket = pick_column(names, key_column or "Key", _KEY_COLUMNS, "key", manifest.url), "Bucket"
        else:
            ds = ray.data.read_parquet(files, filesystem=manifest.arrow_fs, num_cpus=task_cpus)
            key = pick_column(ds.schema().names, key_column or "key", _KEY_COLUMNS, "key", manifest.url)
            bucket = "bucket"
    elif name.endswith((".csv", ".csv.gz")):
        ds = ray.data.read_csv(manifest.path, filesystem=manifest.arrow_fs, num_cpus=task_cpus)
        key = pick_column(ds.schema().names, key_column, _KEY_COLUMNS, "key", manifest.url)
    elif name.endswith(".parquet") or manifest.fs.isdir(manifest.path):
        ds = ray.data.read_parquet(manifest.path, filesystem=manifest.arrow_fs, num_cpus=task_cpus)
        key = pick_column(ds.schema().names, key_column, _KEY_COLUMNS, "key", manifest.url)
    else:
        raise ValueError(f"--input-manifest must be a .parquet or .csv file of keys, or an S3 Inventory "
                         f"manifest.json; got {manifest.url}")
    return ds.map_batches(_to_paths, fn_kwargs={"key": key, "base": base, "bucket": bucket},
                          batch_format="numpy", **tasks)
