"""Import layers that point one way: what an actor, the planner and the aggregator load."""

from __future__ import annotations

import json
import subprocess
import sys


def _imported(module: str) -> set[str]:
    """Modules a fresh interpreter holds after importing ``module``."""
    code = f"import json, sys, {module}; print(json.dumps(sorted(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    return set(json.loads(out.strip().splitlines()[-1]))


def test_a_model_actor_loads_no_dataset_training_or_compression_module():
    loaded = _imported("ngt_ray.stages")
    offline = {"datasets", "embeddings", "train", "finetune", "compress", "easier", "pruning", "acceptance",
               "calibrate", "evaluate", "demo", "benchmark"}
    assert not {f"ngt_ray.{name}" for name in offline} & loaded
    assert "torch_pruning" not in loaded


def test_the_planner_and_the_aggregator_are_torch_free():
    for module in ("ngt_ray.planning", "ngt_ray.stats", "ngt_ray.algorithms", "ngt_ray.cost_table"):
        assert "torch" not in _imported(module), module
