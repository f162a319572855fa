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
    loaded = _imported("ngt_ray.job.stages")
    assert not {m for m in loaded if m.startswith(("ngt_ray.training", "ngt_ray.tools"))}
    assert "torch_pruning" not in loaded


def test_sub_packages_import_only_the_layers_below_them():
    """grouptesting < nets < training, job < tools, cluster < cli: no module imports from a layer above."""
    import ast
    from pathlib import Path

    rank = {"options": 0, "storage": 0, "grouptesting": 1, "nets": 2, "training": 3, "job": 3, "tools": 4, "cluster": 4,
            "cli": 5}
    root = Path(__file__).resolve().parent.parent / "ngt_ray"
    for path in root.rglob("*.py"):
        layer = path.relative_to(root).parts[0].removesuffix(".py")
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("ngt_ray."):
                target = node.module.split(".")[1]
                assert rank[target] <= rank[layer] and {layer, target} != {"training", "job"}, \
                    f"{path.relative_to(root)} imports {node.module}"


def test_the_planner_and_the_aggregator_are_torch_free():
    for module in ("ngt_ray.grouptesting.planning", "ngt_ray.job.stats", "ngt_ray.grouptesting.algorithms",
                   "ngt_ray.grouptesting.cost_table"):
        assert "torch" not in _imported(module), module
