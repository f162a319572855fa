"""The report's parts on a written output of known rows: what it picks, counts and draws (no Ray)."""

from __future__ import annotations

import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from ngt_ray.job.contracts import FLAGS_SCHEMA
from ngt_ray.job.preflight import UsageError
from ngt_ray.report.plots import plot_all
from ngt_ray.report.results import SCORE_BINS, RunResults
from ngt_ray.report.thumbnails import thumbnail
from ngt_ray.storage import resolve


def _row(i: int, decided: str, score: float | None, flagged: bool = False, kind: str | None = None) -> dict:
    return {"uri": f"s3://b/{i:04d}.jpg", "flagged": flagged, "score": score, "group_id": i // 8 if score else None,
            "group_size": 8, "group_score": score, "decided_by": decided, "tests": 0.125, "compute_macs": 1.0,
            "compute_seconds": None, "error": f"broken {i}" if kind else None, "error_kind": kind}


@pytest.fixture
def output(tmp_path):
    """Three flags files: 30 group-cleared rows, 10 retests (4 flagged), 5 read errors, 1 decode error."""
    rng = np.random.default_rng(0)
    rows = [_row(i, "group", float(rng.uniform(0, 0.2))) for i in range(30)]
    rows += [_row(30 + i, "retest", 0.9 - i * 0.05, flagged=i < 4) for i in range(10)]
    rows += [_row(40 + i, "error", None, kind="read") for i in range(5)] + [_row(45, "error", None, kind="decode")]
    (tmp_path / "flags").mkdir()
    for n, part in enumerate((rows[:15], rows[15:33], rows[33:])):
        pq.write_table(pa.Table.from_pylist(part, schema=FLAGS_SCHEMA), tmp_path / "flags" / f"{n}.parquet")
    stats = {"objects": 46, "images": 46, "flagged": 4, "errors": 6, "group_threshold": 0.18,
             "individual_threshold": 0.7, "compute_saving": 0.5, "wall_seconds": 10.0, "seconds_round_1": 1.5,
             "seconds_confirm": 2.0, "seconds_wait": 0.5}
    pq.write_table(pa.Table.from_pylist([stats]), tmp_path / "stats.parquet")
    (tmp_path / "run.json").write_text(json.dumps({"input": "s3://b/"}))
    return {"loc": resolve(str(tmp_path)), "rows": rows}


def test_the_report_picks_the_top_flagged_and_the_nearest_cleared_across_batches(output):
    results = RunResults.read(output["loc"], limit=3, near=4, batch_rows=7)
    rows = output["rows"]
    assert results.flagged["uri"].to_pylist() == [rows[30 + i]["uri"] for i in range(3)]  # highest first, capped
    assert results.flagged_total == 4
    # cleared rows by score over their own test's threshold: retests against 0.7, group tests against 0.18
    cleared = [r for r in rows if r["decided_by"] in ("group", "retest") and not r["flagged"]]
    ratio = {r["uri"]: r["score"] / (0.18 if r["decided_by"] == "group" else 0.7) for r in cleared}
    assert results.near["uri"].to_pylist() == sorted(ratio, key=lambda u: -ratio[u])[:4]
    assert results.decided == {"group": 30, "retest": 10, "error": 6}
    assert results.histograms["screen"].sum() == 30 and results.histograms["individual"].sum() == 10
    assert len(results.histograms["screen"]) == len(SCORE_BINS) - 1
    assert {kind: (s.count, len(s.examples)) for kind, s in results.errors.items()} == {"read": (5, 3),
                                                                                         "decode": (1, 1)}
    assert results.errors["decode"].examples == [(rows[45]["uri"], "broken 45")]


def test_the_plots_are_pngs(output):
    pngs = plot_all(RunResults.read(output["loc"]))
    assert sorted(pngs) == ["phases", "rounds", "scores"]
    for png in pngs.values():
        assert Image.open(io.BytesIO(png)).format == "PNG"


def test_an_output_without_a_run_is_a_usage_error(tmp_path):
    with pytest.raises(UsageError, match="holds no finished ngt-ray run"):
        RunResults.read(resolve(str(tmp_path)))


@pytest.mark.parametrize("mode", ["RGBA", "P", "I;16", "L", "CMYK"])
def test_thumbnails_are_small_rgb_jpegs_whatever_the_mode(mode):
    image = Image.new("RGB", (640, 320), (200, 30, 30)).convert(mode)
    data = io.BytesIO()
    image.save(data, "TIFF" if mode in ("I;16", "CMYK") else "PNG")
    small = Image.open(io.BytesIO(thumbnail(data.getvalue())))
    assert small.format == "JPEG" and small.mode == "RGB" and small.size == (160, 80)
