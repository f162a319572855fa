"""The aggregator: one stats row from the written flags, with the compute that was spent.

Stats are computed from the flags as written (a column-pruned re-read, a few bytes per image), so
they describe exactly what the user reads, and the counts add up by construction.
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc
import ray.data

from ngt_ray.costs import ModelCosts

__all__ = ["count_rows", "summarize"]

_COUNTS = ("images", "errors", "flagged", "retests", "group_tests")


def count_rows(batch: pa.Table) -> pa.Table:
    """Partial counts of one batch. A group of n members contributes 1/n per member, so group tests
    add up exactly even when a group's rows span batches (error rows have no group: null size)."""

    def count(mask: pa.ChunkedArray) -> int:
        return int(pc.sum(mask).as_py() or 0)

    decided = batch["decided_by"]
    group_share = pc.divide(1.0, pc.cast(batch["group_size"], pa.float64()))
    return pa.table({
        "images": [batch.num_rows],
        "errors": [count(pc.equal(decided, "error"))],
        "flagged": [count(batch["flagged"])],
        "retests": [count(pc.equal(decided, "retest"))],
        "group_tests": [float(pc.sum(group_share).as_py() or 0.0)],
    })


def summarize(flags: ray.data.Dataset, costs: ModelCosts, info: dict, wall_seconds: float) -> pa.Table:
    """Reduce the flags to the stats row (``info`` adds model name, design, thresholds, ...)."""
    partial = flags.map_batches(count_rows, batch_format="pyarrow").to_pandas()
    totals = {name: float(partial[name].sum()) if len(partial) else 0.0 for name in _COUNTS}
    images, errors = int(totals["images"]), int(totals["errors"])
    group_tests, retests = int(round(totals["group_tests"])), int(totals["retests"])
    screened = images - errors
    macs_total = (
        screened * costs.early_per_image + group_tests * costs.late_per_group + retests * costs.individual_per_image
    )
    baseline = screened * costs.individual_per_image
    row = {
        "images": images,
        "errors": errors,
        "flagged": int(totals["flagged"]),
        "group_size": int(info["group_size"]),
        "group_tests": group_tests,
        "retests": retests,
        "macs_per_image_individual": costs.individual_per_image,
        "macs_total": macs_total,
        "compute_saving": 1.0 - macs_total / baseline if baseline else 0.0,
        "wall_seconds": wall_seconds,
        "images_per_second": images / wall_seconds if wall_seconds > 0 else 0.0,
        **{k: v for k, v in info.items() if k != "group_size"},
    }
    return pa.Table.from_pylist([row])
