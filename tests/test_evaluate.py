"""``ngt-ray evaluate`` end to end at a tiny size: real photos, the packaged models, every algorithm."""

from __future__ import annotations

import math

import pyarrow.parquet as pq
import pytest

from ngt_ray.nets.checkpoint import default_screen_model
from ngt_ray.tools.evaluate import (
    EvaluationConfig,
    dorfman_reference,
    entropy_bound,
    evaluate,
)


def test_reference_curves_match_theory():
    # Dorfman's optimum is close to 2 sqrt(p) at low prevalence; the counting bound is below it
    for p in (0.001, 0.01):
        assert dorfman_reference(p) == pytest.approx(2 * math.sqrt(p), rel=0.1)
        assert entropy_bound(p) < dorfman_reference(p)
    assert entropy_bound(0.001) == pytest.approx(0.0114, abs=1e-4)


def test_evaluate_writes_table_and_plots(caltech, tmp_path):
    table = evaluate(EvaluationConfig(data=caltech, models=[str(default_screen_model())], output=tmp_path,
                                      sizes=(2, 4), prevalences=(0.05,), population=40, trials=1,
                                      algorithms=("dorfman", "halving", "overlap")))
    rows = pq.read_table(tmp_path / "results.parquet").to_pylist()
    assert rows == table.to_pylist() and len(rows) == 3 * 2  # algorithms x sizes
    assert {r["algorithm"] for r in rows} == {"dorfman", "halving", "overlap"}
    for r in rows:
        assert 0 <= r["recall"] <= 1 and 0 <= r["recall_of_individual"] <= 1 and r["positives"] >= 1
        # the cost identity: relative MACs >= the per-image stages alone; confirmations cost a full model
        assert r["relative_macs"] > 0 and r["relative_time"] > 0
        assert r["tests_per_image"] == pytest.approx((r["group_tests"] + r["confirmations"]) / r["images"])
    by = {(r["algorithm"], r["k"]): r for r in rows}
    for k in (2, 4):  # same groups in round one: halving confirms a subset of Dorfman's candidates
        assert by[("halving", k)]["confirmations"] <= by[("dorfman", k)]["confirmations"]
        assert by[("overlap", k)]["group_tests"] == 2 * by[("dorfman", k)]["group_tests"]
    assert (tmp_path / "evaluation.png").stat().st_size > 10_000
    assert "| dorfman |" in (tmp_path / "results.md").read_text()


def test_evaluate_draws_buckets_from_a_manifest_with_composites(real_scenes, tmp_path):
    photos = sorted((real_scenes / "firearms" / "images").iterdir())[:25]
    scenes = sorted((real_scenes / "scenes" / "images").iterdir())[:40]
    rows = [(p, 1, "test") for p in photos] + [(p, 0, "test") for p in scenes]
    (tmp_path / "m.csv").write_text("uri,label,split\n" + "".join(f"{p},{y},{s}\n" for p, y, s in rows))
    table = evaluate(EvaluationConfig(manifest=str(tmp_path / "m.csv"), paste=5, models=[str(default_screen_model())],
                                      output=tmp_path / "out", sizes=(2,), prevalences=(0.05,), trials=2,
                                      algorithms=("halving",), timing=False))
    (row,) = table.to_pylist()
    assert row["images"] == 40 + 2 and row["positives"] == 2  # all 40 scenes, 2 planted at 5 %
    assert "plus 5 copy-paste positives" in (tmp_path / "out" / "results.md").read_text()
