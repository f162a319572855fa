"""Where the time goes: per-batch phase timings of every model actor and decode task, summed.

A user of a batch job asks "where did my hour go" first, and a GPU that sits idle is only
diagnosable when every phase in front of it is measured. Each actor keeps a ``PhaseClock``:
per batch it records the wall seconds and CPU seconds (of the thread) of each phase, and on a GPU
the seconds the device spent on the model phases (CUDA events, no extra synchronisation). It
sends one record per batch to a ``PhaseLedger`` actor, which the driver reads when the job ends.

Phases, in the order a batch meets them:

* ``wait``: the actor idle between the end of one batch and the start of the next (starved);
* ``decode``: CPU decode tasks, or decoding inside the model actor (``--decode gpu``);
* ``to_device``: pixels copied to the model's device (pinned, non-blocking);
* ``embed``: the screen model's per-image stages;
* ``round_1`` ... ``round_4plus``: each round of the group-testing algorithm (one batched
  forward of the shared stages, its scores back on the host);
* ``bookkeeping``: the algorithm around its rounds, group ids, per-row costs and prevalence;
* ``confirm``: the individual model on the candidates (decode of their bytes included);
* ``output``: building the output rows.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import Any

import ray

__all__ = ["DEVICE_PHASES", "OPERATOR_STAGES", "PHASES", "PhaseClock", "PhaseLedger", "collect",
           "operator_cpu_seconds", "round_phase", "start_ledger"]

PHASES = ("wait", "decode", "to_device", "embed", "round_1", "round_2", "round_3", "round_4plus", "bookkeeping",
          "confirm", "output")
# phases whose work is the model's device (GPU-busy time is measured on these)
DEVICE_PHASES = ("embed", "round_1", "round_2", "round_3", "round_4plus", "confirm")


def round_phase(i: int) -> str:
    """Phase name of round ``i`` (1-based) of the algorithm."""
    return f"round_{i}" if i < 4 else "round_4plus"


class PhaseClock:
    """Per-batch phase timer of one actor or task.

    Wall time comes from ``perf_counter``, CPU time from ``thread_time`` (the calling thread, so
    Ray's own threads do not count). On CUDA, device phases are bracketed by events and their
    elapsed time is read once per batch, after the batch's last synchronisation, so measuring
    costs no extra sync.
    """

    def __init__(self, cuda: bool = False) -> None:
        self.cuda = cuda
        self._last_end: float | None = None
        self._reset()

    def _reset(self) -> None:
        self.wall: dict[str, float] = {}
        self.cpu: dict[str, float] = {}
        self._events: list[tuple[Any, Any]] = []
        self._stack: list[list[float]] = []  # per open phase: wall and CPU seconds of nested phases

    def start_batch(self) -> None:
        """Call when a batch arrives: the gap since the last batch ended is ``wait``."""
        now = time.perf_counter()
        self._reset()
        if self._last_end is not None:
            self.wall["wait"] = now - self._last_end

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Time the block as ``name``. Phases nest: a phase's own time excludes its nested ones."""
        if name not in PHASES:
            raise ValueError(f"unknown phase {name!r}; phases are {PHASES}")
        events = None
        if self.cuda and name in DEVICE_PHASES:
            import torch

            events = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
            events[0].record()
        nested = [0.0, 0.0]
        self._stack.append(nested)
        wall, cpu = time.perf_counter(), time.thread_time()
        try:
            yield
        finally:
            if events is not None:
                events[1].record()
                self._events.append(events)
            wall, cpu = time.perf_counter() - wall, time.thread_time() - cpu
            self._stack.pop()
            if self._stack:
                self._stack[-1][0] += wall
                self._stack[-1][1] += cpu
            self.wall[name] = self.wall.get(name, 0.0) + wall - nested[0]
            self.cpu[name] = self.cpu.get(name, 0.0) + cpu - nested[1]

    def finish_batch(self, images: int) -> dict[str, Any]:
        """The batch's record; the next ``wait`` starts now."""
        device = 0.0
        if self._events:
            self._events[-1][1].synchronize()
            device = sum(start.elapsed_time(end) for start, end in self._events) / 1e3
        self._last_end = time.perf_counter()
        return {"images": images, "batches": 1, "wall": dict(self.wall), "cpu": dict(self.cpu),
                "device_seconds": device, "node": _node_id(), "finished_at": time.time()}


def _node_id() -> str:
    """The Ray node this runs on ("" outside Ray): the stats say how many nodes did the work."""
    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""


@ray.remote(num_cpus=0)
class PhaseLedger:
    """Sums the records of every model actor (``source="model"``) and decode task
    (``"decode_tasks"``) of one job; images are counted by the model actors."""

    def __init__(self) -> None:
        self.totals: dict[str, Any] = {"images": 0, "batches": 0, "device_seconds": 0.0,
                                       "wall": dict.fromkeys(PHASES, 0.0), "cpu": dict.fromkeys(PHASES, 0.0),
                                       "decode_tasks": {"images": 0, "wall": 0.0, "cpu": 0.0},
                                       "nodes": {"model": [], "decode_tasks": []}, "first_output_at": None,
                                       "shapes": {"cold_model_calls": 0, "model_call_rows": 0, "padded_rows": 0},
                                       "warmup": {"actors": 0, "warmup_seconds": 0.0, "compile_seconds": 0.0,
                                                  "model_call_shapes": 0, "compile_cache_hits": 0}}

    def add_warmup(self, record: dict[str, Any]) -> None:
        """A model actor's warm-up (``ngt_ray.nets.shapes.warm_up``): seconds and cache hits add up
        over actors; the shape set is the same for all, so its size is the largest."""
        warmup = self.totals["warmup"]
        warmup["actors"] += 1
        for name in ("warmup_seconds", "compile_seconds", "compile_cache_hits"):
            warmup[name] += record.get(name, 0)
        warmup["model_call_shapes"] = max(warmup["model_call_shapes"], record.get("model_call_shapes", 0))

    def add(self, record: dict[str, Any], source: str = "model") -> None:
        t = self.totals
        node = record.get("node")
        if node and node not in t["nodes"][source]:
            t["nodes"][source].append(node)
        if source == "decode_tasks":
            tasks = t["decode_tasks"]
            tasks["images"] += record["images"]
            tasks["wall"] += sum(record["wall"].values())
            tasks["cpu"] += sum(record["cpu"].values())
            return
        t["images"] += record["images"]
        t["batches"] += record["batches"]
        if "finished_at" in record:
            first = t["first_output_at"]
            t["first_output_at"] = record["finished_at"] if first is None else min(first, record["finished_at"])
        t["device_seconds"] += record["device_seconds"]
        for name, value in record.get("shapes", {}).items():
            t["shapes"][name] += value
        for kind in ("wall", "cpu"):
            for name, seconds in record[kind].items():
                t[kind][name] += seconds

    def get(self) -> dict[str, Any]:
        return self.totals


def start_ledger() -> ray.actor.ActorHandle:
    """A ledger for one job, pinned to the driver's node (it uses no CPU reservation): a worker node
    lost mid-run must not take the job's timings, and so its stats, with it."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    return PhaseLedger.options(scheduling_strategy=here).remote()


def collect(ledger: ray.actor.ActorHandle, images: int, timeout: float = 30.0) -> dict[str, Any]:
    """The ledger's totals once it has heard about ``images`` images (records are sent without
    waiting, so the last ones may still be on their way when the job's output is written)."""
    deadline = time.monotonic() + timeout
    while True:
        totals = ray.get(ledger.get.remote())
        if totals["images"] >= images or time.monotonic() > deadline:
            return totals
        time.sleep(0.05)


OPERATOR_STAGES = ("read", "decode", "model", "write")


def _stage_of(operator: str) -> str:
    if "decode_batch" in operator:
        return "decode"
    if "Moderator" in operator or "Classifier" in operator:
        return "model"
    if operator.startswith("Write"):
        return "write"
    return "read"  # the reader and the maps fused into it (uri, WebDataset and Parquet unpacking)


def operator_cpu_seconds(ds: ray.data.Dataset) -> dict[str, float]:
    """CPU seconds of each stage (read, decode, model, write) of an executed dataset, from Ray
    Data's own per-operator execution stats; zeros where Ray kept none."""
    out = dict.fromkeys(OPERATOR_STAGES, 0.0)
    try:
        stack = [ds.get_stats_summary()]
    except Exception:  # noqa: BLE001  (stats are diagnostics: never fail a finished job over them)
        return out
    while stack:
        node = stack.pop()
        for op in node.operators_stats:
            if op.cpu_time is not None:
                out[_stage_of(op.operator_name)] += float(op.cpu_time.sum)
        stack.extend(node.parents)
    return out
