"""Build a run's report into ``<output>/report/``, on a local disk or a bucket.

The report is derived data: it is written after the run's ``_SUCCESS`` and can be rebuilt at any
time (thumbnails already there are kept). Every file goes through ``fetch.put``, complete or absent,
and ``index.html`` last, so a report folder with an index is a whole report.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib.resources import files
from pathlib import Path

from ngt_ray.job.fetch import put, single_attempt_client
from ngt_ray.report.page import render
from ngt_ray.report.plots import plot_all
from ngt_ray.report.results import RunResults
from ngt_ray.report.thumbnails import make_thumbnails
from ngt_ray.storage import Location, resolve

__all__ = ["Report", "build_report", "local_copy"]

log = logging.getLogger(__name__)

_STATIC = ("report.css", "report.js")


@dataclass(frozen=True)
class Report:
    """A built report: where its page is, what it shows, and what it cost."""

    index: str  # URL of index.html
    folder: Location
    flagged: int  # flagged rows of the run
    thumbnails: int  # images shown (flagged and near the threshold)
    without_thumbnail: int
    seconds: float
    seconds_by_part: dict[str, float]


def build_report(output: str, *, s3_endpoint: str | None = None, max_thumbnails: int = 500,
                 near_threshold: int = 24) -> Report:
    """Write ``<output>/report/index.html`` with its thumbnails and plots; see ``ngt_ray.report``."""
    start = time.perf_counter()
    root = resolve(output, s3_endpoint)
    results = RunResults.read(root, limit=max_thumbnails, near=near_threshold)
    read = time.perf_counter()
    folder = root.join("report")
    if "file" in folder.fs.protocol:
        for sub in ("thumbs", "plots"):
            os.makedirs(folder.join(sub).path, exist_ok=True)
    shown = results.flagged["uri"].to_pylist() + results.near["uri"].to_pylist()
    config = results.config
    # the images live where the run read them: at its endpoint, unless this call names one
    failed = make_thumbnails(shown, folder, s3_endpoint=s3_endpoint or config.get("s3_endpoint"),
                             packed_columns=(config.get("image_column"), config.get("key_column")))
    thumbs = time.perf_counter()
    client = single_attempt_client(folder.fs)  # one S3 client for the page's writes
    for name, png in plot_all(results).items():
        put(client, folder.join("plots", f"{name}.png").path, png)
    plots = time.perf_counter()
    for name in _STATIC:
        put(client, folder.join(name).path, files("ngt_ray.report").joinpath("static", name).read_bytes())
    generated = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    put(client, folder.join("index.html").path, render(results, failed, generated).encode())
    end = time.perf_counter()
    parts = {"read": read - start, "thumbnails": thumbs - read, "plots": plots - thumbs, "page": end - plots}
    log.info("report %s in %.1f s (%s)", folder.url, end - start, ", ".join(f"{k} {v:.1f} s" for k, v in parts.items()))
    return Report(folder.join("index.html").url, folder, results.flagged_total, len(shown), len(failed),
                  end - start, parts)


def local_copy(report: Report, into: Path | None = None) -> Path:
    """The report's ``index.html`` on this machine: itself where it was written to a local disk, else a
    copy of its folder (under ``into``, default ``~/.cache/ngt-ray/reports/``) that a browser can open."""
    folder = report.folder
    if "file" in folder.fs.protocol:
        return Path(folder.path) / "index.html"
    name = folder.path.strip("/").replace("/", "_")
    target = (into or Path.home() / ".cache" / "ngt-ray" / "reports") / name
    target.mkdir(parents=True, exist_ok=True)
    folder.fs.get(folder.path.rstrip("/") + "/", str(target) + "/", recursive=True)
    return target / "index.html"
