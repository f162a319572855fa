"""The job's plan, without Ray: where actors go, batch sizes, decode placement, bad choices."""

from __future__ import annotations

import pytest

from ngt_ray.job.plan import ModerationConfig, actor_placement, plan


def test_gpu_actors_share_each_gpu_and_leave_the_cpus_to_decode():
    placement = actor_placement({"CPU": 16, "GPU": 1})
    assert placement.on_gpu and placement.max_actors == 2
    assert placement.resources == {"num_gpus": 0.5, "num_cpus": 1}
    assert actor_placement({"CPU": 64, "GPU": 4}, actors_per_gpu=1).max_actors == 4
    assert not actor_placement({"CPU": 16, "GPU": 1}, device="cpu").on_gpu


def test_cpu_actors_always_leave_a_core_for_read_and_decode():
    for cpus in (2, 3, 4, 16, 64):
        placement = actor_placement({"CPU": cpus})
        reserved = placement.max_actors * placement.resources["num_cpus"]
        assert reserved <= cpus - 1 or (cpus == 2 and reserved <= 1)
        assert placement.resources["num_cpus"] <= 4 and placement.threads >= 1
    with pytest.raises(RuntimeError, match="no GPUs"):
        actor_placement({"CPU": 4}, device="cuda")


def test_plan_decides_batches_decode_and_models_up_front():
    on_gpu = plan(ModerationConfig(input="in", output="out"), {"CPU": 16, "GPU": 1})
    assert on_gpu.batch_size == 1024 and on_gpu.decode_in_tasks and not on_gpu.actor.decode_here
    assert on_gpu.timing_batch == on_gpu.batch_size  # auto k is timed the way the actors run
    assert on_gpu.actor.screen_model and on_gpu.decode_size == 160 and on_gpu.info["decode"] == "cpu"
    few_cpus = plan(ModerationConfig(input="in", output="out"), {"CPU": 16, "GPU": 4})  # CPUs are short: nvJPEG
    assert few_cpus.actor.decode_here and not few_cpus.decode_in_tasks and few_cpus.info["decode"] == "gpu"
    forced = plan(ModerationConfig(input="in", output="out", decode="gpu"), {"CPU": 2})
    assert forced.actor.decode_here and forced.actor.device == "cpu"
    on_cpu = plan(ModerationConfig(input="in", output="out", decode="auto"), {"CPU": 2})
    assert on_cpu.decode_in_tasks and on_cpu.batch_size == 256 and on_cpu.actor.device == "cpu"
    baseline = plan(ModerationConfig(input="in", output="out", screen=False), {"CPU": 16, "GPU": 1})
    assert baseline.actor.screen_model is None and baseline.decode_size == 224 and baseline.batch_size == 512
    assert baseline.info["algorithm"] == baseline.info["design"] == "none"
    assert baseline.actor.macs.confirm == on_gpu.actor.macs.confirm > on_gpu.actor.macs.embed
    stub = plan(ModerationConfig(input="in", output="out", stub_models=True), {"CPU": 2})
    assert stub.actor.macs.confirm < 1e6 < on_cpu.actor.macs.confirm  # stand-ins cost next to nothing
    assert {stub.info["group_threshold"]} == {0.5}


@pytest.mark.parametrize("bad, match", [({"algorithm": "magic"}, "algorithm must be one of"),
                                        ({"decode": "fpga"}, "decode must be one of"),
                                        ({"runtime": "turbo"}, "runtime must be one of"),
                                        ({"group_size": 0}, "group size must be"),
                                        ({"batch_size": 0}, "batch size must be")])
def test_plan_rejects_bad_choices_clearly(bad, match):
    with pytest.raises(ValueError, match=match):
        plan(ModerationConfig(input="in", output="out", **bad), {"CPU": 2})
