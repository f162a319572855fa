"""Where the model actors go and what every task asks for, from the shapes of the cluster's nodes.

Sizing from the cluster's totals hangs small clusters: on 1+1 or 2+2 CPU nodes each actor took a
node's share and the read/decode task that feeds them waited forever in PENDING_NODE_ASSIGNMENT;
on three 2-CPU nodes an actor asked for more CPUs than any node has. So every request here is
sized from the nodes themselves, and every node keeps room for one read/decode task:

- CPU actors take at most three quarters of a node and never its last ``task_cpus``; the pool's
  ceiling is how many such actors the nodes hold side by side.
- GPU actors share each GPU (``actors_per_gpu``) and take one CPU each where the GPU nodes have
  CPUs to spare. Their pool has no ceiling, so it grows as an autoscaling cluster adds GPU nodes.
- Read, decode and write tasks ask for ``task_cpus``: one CPU, or half of one where some node has
  a single CPU, so they fit beside an actor on any node.

Requests that no node can hold raise at once with the nodes' shapes, instead of hanging.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

__all__ = ["Placement", "PlacementError", "actor_placement", "cluster_nodes", "cluster_totals"]

Nodes = Sequence[Mapping[str, float]]


class PlacementError(RuntimeError):
    """The cluster's nodes cannot hold the job's actors and the tasks that feed them."""


@dataclass(frozen=True)
class Placement:
    """Ray resources of one model actor, the pool's ceiling, torch threads per actor, and the
    CPUs of each read/decode/write task."""

    resources: Mapping[str, float]
    max_actors: int  # actors the nodes hold now (GPU pools may grow past it: see ``pool_max``)
    threads: int
    task_cpus: float = 1.0
    grows: bool = False  # the pool follows the cluster as nodes join (GPU pools without --max-actors)

    @property
    def on_gpu(self) -> bool:
        return "num_gpus" in self.resources

    @property
    def pool_max(self) -> int | None:
        """``ActorPoolStrategy(max_size=...)``: None lets Ray Data add actors as resources appear."""
        return None if self.grows else self.max_actors

    @property
    def task_resources(self) -> dict[str, float]:
        return {"num_cpus": self.task_cpus}


def cluster_nodes() -> list[dict[str, float]]:
    """Each alive node's total resources (needs a connected Ray)."""
    import ray

    return [dict(node["Resources"]) for node in ray.nodes() if node.get("Alive")]


def cluster_totals(nodes: Nodes) -> dict[str, float]:
    totals: dict[str, float] = {}
    for node in nodes:
        for name, amount in node.items():
            totals[name] = totals.get(name, 0.0) + amount
    return totals


def _shapes(nodes: Nodes) -> str:
    return ", ".join(f"{node.get('CPU', 0):g} CPU" + (f" + {node['GPU']:g} GPU" if node.get("GPU") else "")
                     for node in nodes) or "no nodes"


def _floor_to(value: float, step: float) -> float:
    return math.floor(value / step + 1e-9) * step


def actor_placement(nodes: Nodes | Mapping[str, float], device: str = "auto", max_actors: int | None = None,
                    actors_per_gpu: int = 2) -> Placement:
    """The placement for ``nodes`` (each node's total resources; one mapping is one node).

    Each actor holds both models, so a candidate is confirmed where it was screened and cleared
    rows never reach the confirming model.
    """
    nodes = [nodes] if isinstance(nodes, Mapping) else list(nodes)
    cpus = [float(node.get("CPU", 0)) for node in nodes]
    if not any(cpus):
        raise PlacementError(f"the cluster has no CPUs for read and decode tasks ({_shapes(nodes)})")
    task_cpus = 1.0 if min(c for c in cpus if c > 0) >= 2 else 0.5
    gpu_nodes = [node for node in nodes if node.get("GPU", 0) >= 1] if device != "cpu" else []
    if device == "cuda" and not gpu_nodes:
        raise PlacementError(f"--device cuda was asked for but the cluster has no GPUs ({_shapes(nodes)})")
    if gpu_nodes:
        per_gpu = max(1, actors_per_gpu)
        # One CPU per actor for its batch assembly and bookkeeping, less where a GPU node would
        # otherwise have no room left for a decode task.
        spare = min((float(n.get("CPU", 0)) - task_cpus) / (per_gpu * int(n["GPU"])) for n in gpu_nodes)
        actor_cpus = max(0.0, min(1.0, _floor_to(spare, 0.25)))
        held = sum(int(n["GPU"]) for n in gpu_nodes) * per_gpu
        return Placement({"num_gpus": 1 / per_gpu, "num_cpus": actor_cpus}, max_actors or held, 1, task_cpus,
                         grows=max_actors is None)
    # What actors may take on each node: three quarters of it, never the room for a task.
    step = 0.5 if task_cpus < 1 else 1.0  # whole CPUs where tasks take whole CPUs: no stranded halves
    shares = [max(0.0, min(0.75 * c, c - task_cpus)) for c in cpus]
    actor_cpus = _floor_to(min(4.0, max(shares)), step)
    if actor_cpus <= 0:
        raise PlacementError(f"no node can hold a model actor beside a {task_cpus:g}-CPU read/decode task "
                             f"({_shapes(nodes)}); add a node with 2 or more CPUs")
    held = sum(math.floor(share / actor_cpus + 1e-9) for share in shares)
    return Placement({"num_cpus": actor_cpus}, max_actors or held, max(1, round(actor_cpus)), task_cpus)
