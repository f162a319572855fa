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
    """grouptesting < nets < training, job < tools, report, cluster < cli: no module imports from a layer above."""
    import ast
    from pathlib import Path

    rank = {"options": 0, "errors": 0, "storage": 0, "grouptesting": 1, "nets": 2, "training": 3, "job": 3, "tools": 4,
            "report": 4, "cluster": 4, "cli": 5}
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


def _import_graph() -> dict[str, set[str]]:
    """Module -> the ngt_ray modules it imports, type-checking imports included (a cycle there is
    still two modules that each need the other)."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    modules = {".".join(p.relative_to(root).with_suffix("").parts).removesuffix(".__init__"): p
               for p in (root / "ngt_ray").rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        targets = graph.setdefault(name, set())
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("ngt_ray"):
                for alias in node.names:  # `from ngt_ray.x import y` imports the module x.y where there is one
                    sub = f"{node.module}.{alias.name}"
                    targets.add(sub if sub in modules else node.module)
            elif isinstance(node, ast.Import):
                targets.update(a.name for a in node.names if a.name in modules)
        targets.discard(name)
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph`` as a path that returns to its start, or None."""
    state: dict[str, int] = {}  # 1 on the current path, 2 done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == 1:
                return path[path.index(target):] + [target]
            if target not in state and (found := visit(target)):
                return found
        path.pop()
        state[node] = 2
        return None

    return next((found for node in sorted(graph) if node not in state and (found := visit(node))), None)


def test_the_import_graph_has_no_cycle():
    assert _cycle(_import_graph()) is None, " -> ".join(_cycle(_import_graph()))


def test_the_cycle_check_finds_a_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycle(graph) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None
