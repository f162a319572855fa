"""Where the time goes: the phase clock, and a job with stand-in models that accounts for every phase."""

from __future__ import annotations

import pyarrow.parquet as pq
import pytest

from ngt_ray.job.phases import PHASES, PhaseClock
from ngt_ray.job.pipeline import ModerationConfig, run_moderation


def test_phase_clock_nests_and_measures_the_wait_between_batches(monkeypatch):
    """On a clock the test moves by hand: exact seconds, whatever else the machine is doing."""
    now = [100.0]
    monkeypatch.setattr("ngt_ray.job.phases.time.perf_counter", lambda: now[0])
    clock = PhaseClock()
    clock.start_batch()
    with clock.phase("bookkeeping"):
        now[0] += 0.02
        with clock.phase("round_1"):
            now[0] += 0.05
    first = clock.finish_batch(4)
    assert first["wall"]["round_1"] == pytest.approx(0.05)
    assert first["wall"]["bookkeeping"] == pytest.approx(0.02)  # its nested round is not counted twice
    assert "wait" not in first["wall"] and first["images"] == 4
    now[0] += 0.03
    clock.start_batch()
    assert clock.finish_batch(1)["wall"]["wait"] == pytest.approx(0.03)
    with pytest.raises(ValueError, match="unknown phase"), clock.phase("lunch"):
        pass


@pytest.mark.usefixtures("ray_local")
def test_stub_models_run_the_whole_job_and_every_phase_is_accounted(planted, bucket_copy, tmp_path):
    bucket = bucket_copy
    (bucket / "broken.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    stats = run_moderation(ModerationConfig(input=str(bucket), output=str(tmp_path / "out"), stub_models=True,
                                            group_size=4, measure_time=False))
    flags = pq.read_table(tmp_path / "out" / "flags").to_pylist()
    assert len(flags) == stats["images"] == planted.count + 1  # rows in = rows out
    assert [r["decided_by"] for r in flags if r["uri"].endswith("broken.jpg")] == ["error"]
    assert stats["stub_models"] and stats["macs_per_image_individual"] < 1e6
    assert stats["model_batches"] >= 1 and stats["top_phases"]
    for phase in ("embed", "round_1", "bookkeeping", "output"):
        assert stats[f"seconds_{phase}"] > 0, phase
    assert stats["seconds_decode_tasks"] > 0 and stats["cpu_seconds_op_decode"] > 0
    assert stats["cpu_seconds_op_read"] > 0 and stats["cpu_seconds_op_model"] > 0
    assert 0 < stats["device_busy_share"] <= 1
    assert set(f"seconds_{p}" for p in PHASES) <= set(stats)
