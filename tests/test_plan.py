"""The job's plan, without Ray: where actors go, batch sizes, decode placement, bad choices."""

from __future__ import annotations

import pytest

from ngt_ray.job.placement import PlacementError
from ngt_ray.job.plan import ModerationConfig, actor_placement, plan
from ngt_ray.nets.checkpoint import read_card


def test_gpu_actors_share_each_gpu_and_the_pool_grows_with_the_cluster():
    placement = actor_placement({"CPU": 16, "GPU": 1})
    assert placement.on_gpu and placement.max_actors == 2
    assert placement.resources == {"num_gpus": 0.5, "num_cpus": 1}
    assert placement.pool_max is None  # an autoscaling cluster's new GPU nodes get actors too
    assert actor_placement({"CPU": 64, "GPU": 4}, actors_per_gpu=1).max_actors == 4
    assert actor_placement({"CPU": 16, "GPU": 1}, max_actors=3).pool_max == 3
    assert not actor_placement({"CPU": 16, "GPU": 1}, device="cpu").on_gpu
    # a GPU node short of CPUs: the actors take less than a CPU each, so a decode task still fits
    short = actor_placement([{"CPU": 0}, {"CPU": 2, "GPU": 1}])
    assert short.resources["num_cpus"] * short.max_actors <= 2 - short.task_cpus


def _fits(nodes: list[dict[str, float]], placement) -> bool:
    """Place ``max_actors`` actors on ``nodes`` in the worst way (first fit, biggest node first):
    a read/decode task must still fit on some node."""
    free = sorted((n.get("CPU", 0.0) for n in nodes), reverse=True)
    need = placement.resources["num_cpus"]
    for _ in range(placement.max_actors):
        for i, cpus in enumerate(free):
            if cpus >= need:
                free[i] -= need
                break
        else:
            return False  # an actor the nodes cannot hold: the pool would wait forever
    return any(cpus >= placement.task_cpus for cpus in free)


@pytest.mark.parametrize("shape", [[1, 1], [2, 2], [2, 1], [2, 2, 2], [0, 2, 2], [4], [16], [64, 8], [3, 3, 3]])
def test_cpu_actors_are_sized_from_the_nodes_and_leave_every_cluster_room_to_read_and_decode(shape):
    nodes = [{"CPU": float(c)} for c in shape]
    placement = actor_placement(nodes)
    need = placement.resources["num_cpus"]
    assert need <= max(shape) - placement.task_cpus  # one actor fits on a node beside a task
    assert need <= 4 and placement.threads >= 1 and placement.max_actors >= 1
    assert placement.task_cpus <= min(c for c in shape if c)
    assert _fits(nodes, placement)


def test_nodes_too_small_for_any_actor_fail_at_once_naming_their_shapes():
    with pytest.raises(PlacementError, match="no node can hold a model actor.*0.5 CPU"):
        actor_placement([{"CPU": 0.5}, {"CPU": 0.5}])
    with pytest.raises(PlacementError, match="no CPUs"):
        actor_placement([{"CPU": 0, "GPU": 1}])
    with pytest.raises(PlacementError, match="no GPUs"):
        actor_placement({"CPU": 4}, device="cuda")


def test_plan_decides_batches_decode_and_models_up_front():
    on_gpu = plan(ModerationConfig(input="in", output="out"), {"CPU": 16, "GPU": 1})
    assert on_gpu.batch_size == 1024 and on_gpu.decode_in_tasks and not on_gpu.actor.decode_here
    assert on_gpu.timing_batch == on_gpu.batch_size  # auto k is timed the way the actors run
    screen_size = read_card(on_gpu.actor.screen_model).input_size  # the screen's own size: decode makes that
    assert on_gpu.decode_size == screen_size < 224 and on_gpu.info["decode"] == "cpu"
    few_cpus = plan(ModerationConfig(input="in", output="out"), {"CPU": 16, "GPU": 4})  # CPUs are short: nvJPEG
    assert few_cpus.actor.decode_here and not few_cpus.decode_in_tasks and few_cpus.info["decode"] == "gpu"
    forced = plan(ModerationConfig(input="in", output="out", decode="gpu"), {"CPU": 2})
    assert forced.actor.decode_here and forced.actor.device == "cpu"
    on_cpu = plan(ModerationConfig(input="in", output="out", decode="auto"), {"CPU": 2})
    assert on_cpu.decode_in_tasks and on_cpu.batch_size == 256 and on_cpu.actor.device == "cpu"
    baseline = plan(ModerationConfig(input="in", output="out", group_size="none"), {"CPU": 16, "GPU": 1})
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


def test_a_decode_task_that_no_node_can_hold_fails_at_once_saying_what_to_change():
    node = [{"CPU": 2, "memory": 1.1 * 2**30}]  # fits a batch of 16 (1.06 GiB), not of 1024 (1.24 GiB)
    with pytest.raises(PlacementError, match="needs .* GiB of memory .* smaller --batch-size"):
        plan(ModerationConfig(input="in", output="out", batch_size=1024), node)
    assert plan(ModerationConfig(input="in", output="out", batch_size=16), node).batch_size == 16
    with pytest.raises(PlacementError, match="nodes need at least"):
        plan(ModerationConfig(input="in", output="out"), [{"CPU": 2, "memory": 512 * 2**20}])


def test_by_default_the_plan_runs_the_packaged_screen_it_expects_to_cost_least(tmp_path):
    from ngt_ray.nets.checkpoint import default_screens

    cfg = ModerationConfig(input=str(tmp_path), output=str(tmp_path / "out"))
    p = plan(cfg, {"CPU": 4})
    costs = dict(item.rsplit(" ", 1) for item in p.info["screen_choice"].split(", "))
    assert set(costs) == {stem.name for stem in default_screens()} and len(costs) >= 2
    assert p.info["model"] == min(costs, key=lambda name: float(costs[name]))
    # a named design or model is run as asked
    assert plan(ModerationConfig(input=str(tmp_path), output=str(tmp_path / "o"), design="tree"),
                {"CPU": 4}).info["design"] == "tree"
