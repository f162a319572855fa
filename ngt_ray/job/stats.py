"""The aggregator: one stats row from the written flags, with the compute that was spent.

Stats are computed from the flags as written (a column-pruned re-read, a few bytes per image), so
they describe exactly what the user reads, and the counts add up by construction: every row
carries its share of the tests and of the compute, and the shares sum to the totals.

One count does not come from the flags: ``objects``, what the job's listing found. Every listed
object ends as exactly one row, scored or an error of one kind, so ``objects == images == images -
errors + sum(errors_<kind>)``; a difference would be an object lost (or counted twice) on the way.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import pyarrow as pa
import pyarrow.compute as pc
import ray.data

from ngt_ray.errors import ErrorKind
from ngt_ray.grouptesting.cost_table import StageCosts
from ngt_ray.job.phases import PHASES

if TYPE_CHECKING:
    from ngt_ray.job.plan import Placement

__all__ = ["STATS_COLUMNS", "count_flags", "count_rows", "phase_columns", "stats_row", "top_phases"]

STATS_COLUMNS = ["flagged", "decided_by", "group_size", "tests", "compute_macs", "compute_seconds", "error_kind"]
_ERROR_COUNTS = tuple(f"errors_{kind}" for kind in ErrorKind)
_COUNTS = ("images", "errors", "flagged", "retests", "subgroup_cleared", "first_round_groups", "grouped",
           "group_tests", "compute_macs", "compute_seconds", "timed_images", *_ERROR_COUNTS)


def count_rows(batch: pa.Table) -> pa.Table:
    """Partial sums of one batch. A first-round group of n members contributes 1/n per member, so
    group counts add up exactly even when a group's rows span batches (error rows: null shares)."""

    def total(values: pa.ChunkedArray) -> float:
        return float(pc.sum(values).as_py() or 0.0)

    decided = batch["decided_by"]
    seconds = batch["compute_seconds"]
    return pa.table({
        "images": [batch.num_rows],
        "errors": [total(pc.equal(decided, "error"))],
        "flagged": [total(batch["flagged"])],
        "retests": [total(pc.equal(decided, "retest"))],
        "subgroup_cleared": [total(pc.equal(decided, "subgroup"))],
        "first_round_groups": [total(pc.divide(1.0, pc.cast(batch["group_size"], pa.float64())))],
        "grouped": [float(len(batch["group_size"]) - batch["group_size"].null_count)],
        "group_tests": [total(batch["tests"])],
        "compute_macs": [total(batch["compute_macs"])],
        "compute_seconds": [total(seconds)],
        "timed_images": [float(len(seconds) - seconds.null_count)],
        **{f"errors_{kind}": [total(pc.equal(batch["error_kind"], kind.value))] for kind in ErrorKind},
    })


def phase_columns(phases: dict, operators: dict[str, float], stream_seconds: float,
                  placement: Placement) -> dict:
    """Where the time went, as stats columns.

    ``seconds_<phase>`` and ``cpu_seconds_<phase>`` are totals over every model actor
    (actor-seconds: parallel actors add up), ``seconds_decode_tasks`` over the CPU decode tasks.
    ``device_seconds`` is the time the model phases held the models' device (CUDA events on its
    stream, so gaps between kernels count: an upper bound on busy time), ``device_busy_share``
    that over the stream's wall time times the devices the actors share.
    ``cpu_seconds_op_<stage>`` comes from Ray Data's own stats of each operator (read, decode,
    model, write); ``top_phases`` names the largest phases.
    """
    devices = placement.max_actors * float(placement.resources.get("num_gpus", 1.0)) if placement.on_gpu \
        else placement.max_actors
    row: dict = {"stream_seconds": stream_seconds, "device_seconds": phases["device_seconds"],
                 # overlapping actors on one GPU each bracket their own phases: capped at the whole stream
                 "device_busy_share": min(1.0, phases["device_seconds"] / (stream_seconds * devices))
                 if stream_seconds else 0.0,
                 "model_batches": phases["batches"], "top_phases": top_phases(phases["wall"]),
                 # how many nodes the model actors and the decode tasks ran on
                 "model_nodes": len(phases["nodes"]["model"]), "decode_nodes": len(phases["nodes"]["decode_tasks"]),
                 "nodes": len(set(phases["nodes"]["model"]) | set(phases["nodes"]["decode_tasks"]))}
    # the closed set of model-call shapes (ngt_ray.nets.shapes): what warming it cost, and whether
    # any call escaped it (a cold call pays cuDNN planning or a compile mid-stream; the target is 0)
    warmup, shapes = phases["warmup"], phases["shapes"]
    row.update({"warmup_seconds": warmup["warmup_seconds"], "compile_seconds": warmup["compile_seconds"],
                "compile_cache_hits": warmup["compile_cache_hits"], "model_call_shapes": warmup["model_call_shapes"],
                "warmed_actors": warmup["actors"], "cold_model_calls": shapes["cold_model_calls"],
                "padded_share": shapes["padded_rows"] / (shapes["model_call_rows"] + shapes["padded_rows"])
                if shapes["model_call_rows"] else 0.0})
    for name in PHASES:
        row[f"seconds_{name}"] = phases["wall"][name]
        row[f"cpu_seconds_{name}"] = phases["cpu"][name]
    row["seconds_decode_tasks"] = phases["decode_tasks"]["wall"]
    row["cpu_seconds_decode_tasks"] = phases["decode_tasks"]["cpu"]
    for stage, seconds in operators.items():
        row[f"cpu_seconds_op_{stage}"] = seconds
    return row


def top_phases(wall: dict[str, float], n: int = 3) -> str:
    """``"round_1 41%, embed 22%, wait 15%"``: the largest phases by share of all phase time."""
    total = sum(wall.values())
    if not total:
        return ""
    ranked = sorted(wall.items(), key=lambda kv: -kv[1])[:n]
    return ", ".join(f"{name} {sec / total:.0%}" for name, sec in ranked if sec > 0)


def count_flags(flags: ray.data.Dataset) -> dict[str, float]:
    """Sum the flags' per-block counts (``count_rows``) into run totals, in one execution of the
    Dataset: the image count and the stats row both come from these totals, so the driver reads
    the flags back once, not once per figure."""
    partial = flags.map_batches(count_rows, batch_format="pyarrow").to_pandas()
    return {name: float(partial[name].sum()) if len(partial) else 0.0 for name in _COUNTS}


def stats_row(totals: dict[str, float], macs: StageCosts, seconds: StageCosts | None, info: dict,
              wall_seconds: float) -> pa.Table:
    """The stats row from the flags' totals (``count_flags``); ``info`` adds model name, design,
    algorithm, ...

    ``info["objects"]``: what the listing found. Where nothing was listed (a manifest, WebDataset
    or Parquet inputs, whose rows are samples) ``objects`` is the rows written, and
    ``objects_from`` says which: "listing" or "rows".

    ``compute_saving`` compares the MACs spent with the individual model on every screened image;
    ``time_saving`` does the same with the per-stage seconds measured on the actors' device.
    """
    images, errors = int(totals["images"]), int(totals["errors"])
    screened = images - errors
    baseline_macs = screened * macs.confirm
    timed = seconds is not None and screened and totals["timed_images"] == screened
    baseline_seconds = screened * seconds.confirm if timed else math.nan
    groups = totals["first_round_groups"]
    listed = info.get("objects")
    row = {
        "objects": images if listed is None else int(listed),
        "objects_from": "rows" if listed is None else "listing",
        "images": images,
        "errors": errors,
        **{name: int(totals[name]) for name in _ERROR_COUNTS},
        "flagged": int(totals["flagged"]),
        "group_size": info.get("group_size", ""),  # "8", "auto" or "none"
        "mean_group_size": totals["grouped"] / groups if groups else 0.0,
        "first_round_groups": round(groups),
        # confirmed without a group test: no screen, or --group-size auto found screening would not pay
        "unscreened": screened - round(totals["grouped"]),
        "group_tests": round(totals["group_tests"]),
        "retests": int(totals["retests"]),
        "subgroup_cleared": int(totals["subgroup_cleared"]),
        "macs_per_image_individual": macs.confirm,
        "macs_total": totals["compute_macs"],
        "compute_saving": 1.0 - totals["compute_macs"] / baseline_macs if baseline_macs else 0.0,
        "seconds_per_image_individual": seconds.confirm if seconds else math.nan,
        "compute_seconds_total": totals["compute_seconds"] if timed else math.nan,
        "time_saving": 1.0 - totals["compute_seconds"] / baseline_seconds if timed else math.nan,
        "timing_device": seconds.device if seconds else "",
        "wall_seconds": wall_seconds,
        # this attempt's rows: a resumed run skips those an earlier attempt wrote
        "images_per_second": (images - info.get("resumed_rows", 0)) / wall_seconds if wall_seconds > 0 else 0.0,
        **{k: v for k, v in info.items() if k not in ("group_size", "objects")},
    }
    return pa.Table.from_pylist([row])
