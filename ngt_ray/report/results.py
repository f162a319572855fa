"""What a report shows, read from a finished run's output in one streaming pass over its flags.

The page needs a few hundred rows, not the run: the highest-scoring flagged images, the cleared
images closest to their test's threshold, score histograms, counts per decision and per error kind,
and a few examples of each error. They are gathered batch by batch (only the columns they need), so
the driver's memory stays flat however many objects the run wrote.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from ngt_ray.job.fetch import FetchError, fetch
from ngt_ray.job.outputs import RUN_RECORD
from ngt_ray.job.preflight import UsageError
from ngt_ray.storage import Location

__all__ = ["SCORE_BINS", "ErrorKindSummary", "RunResults"]

SCORE_BINS = np.linspace(0.0, 1.0, 41)  # scores are probabilities: 40 bins of 0.025
_COLUMNS = ["uri", "flagged", "score", "group_id", "group_size", "group_score", "decided_by", "error", "error_kind"]
_EXAMPLES = 3  # examples per error kind
# where a row's score was compared with a threshold: the individual model's, or a group test's
_SCREEN_DECISIONS = ("group", "subgroup")


@dataclass
class ErrorKindSummary:
    """The error rows of one kind: how many, and the first few (uri, error)."""

    count: int = 0
    examples: list[tuple[str, str]] = field(default_factory=list)


@dataclass
class RunResults:
    """A run's output, reduced to what its report shows.

    ``flagged``: at most ``limit`` flagged rows, highest score first (``flagged_total`` counts all).
    ``near``: cleared rows closest below the threshold of the test that cleared them (the individual
    model's for ``retest`` rows, the group test's for the others), closest first.
    ``histograms``: counts over ``SCORE_BINS`` of the scores of rows cleared or flagged by the screen
    (``screen``) and by the individual model (``individual``).
    """

    url: str
    stats: dict[str, Any]
    config: dict[str, Any]
    flagged: pa.Table
    flagged_total: int
    near: pa.Table
    histograms: dict[str, np.ndarray]
    decided: dict[str, int]
    errors: dict[str, ErrorKindSummary]

    @classmethod
    def read(cls, output: Location, limit: int = 500, near: int = 24, batch_rows: int = 65536) -> RunResults:
        stats, config = _read_stats(output), _read_json(output.join(RUN_RECORD))
        thresholds = {"individual": float(stats.get("individual_threshold", np.nan)),
                      "screen": float(stats.get("group_threshold", np.nan))}
        flags = output.join("flags")
        if not flags.fs.exists(flags.path):
            raise UsageError(f"{output.url} has no flags/ folder: it is not the output of a finished ngt-ray run")
        dataset = pads.dataset(flags.path, filesystem=flags.arrow_fs, format="parquet")
        top, closest = _empty(dataset.schema), _empty(dataset.schema, margin=True)
        histograms = {name: np.zeros(len(SCORE_BINS) - 1, dtype=np.int64) for name in thresholds}
        decided: dict[str, int] = {}
        errors: dict[str, ErrorKindSummary] = {}
        flagged_total = 0
        for batch in dataset.to_batches(columns=_COLUMNS, batch_size=batch_rows):
            table = pa.Table.from_batches([batch])
            for entry in pc.value_counts(table["decided_by"]).to_pylist():
                decided[str(entry["values"])] = decided.get(str(entry["values"]), 0) + entry["counts"]
            _add_errors(table, errors)
            by_screen = pc.is_in(table["decided_by"], pa.array(_SCREEN_DECISIONS))
            scored = pc.is_valid(table["score"])
            for name, mask in (("screen", by_screen), ("individual", pc.equal(table["decided_by"], "retest"))):
                scores = table["score"].filter(pc.and_(mask, scored)).to_numpy(zero_copy_only=False)
                histograms[name] += np.histogram(np.clip(scores, 0.0, 1.0), SCORE_BINS)[0]
            flagged = table.filter(pc.fill_null(table["flagged"], False))
            flagged_total += flagged.num_rows
            top = _best(pa.concat_tables([top, flagged]), "score", limit)
            cleared = table.filter(pc.and_(pc.invert(pc.fill_null(table["flagged"], False)), scored))
            threshold = pc.if_else(pc.is_in(cleared["decided_by"], pa.array(_SCREEN_DECISIONS)),
                                   thresholds["screen"], thresholds["individual"])
            margin = pc.divide(pc.cast(cleared["score"], pa.float64()), threshold)
            closest = _best(pa.concat_tables([closest, cleared.append_column("margin", margin)]), "margin", near)
        return cls(output.url, stats, config, top, flagged_total, closest, histograms, decided, errors)


def _empty(schema: pa.Schema, margin: bool = False) -> pa.Table:
    table = schema.empty_table().select(_COLUMNS)
    return table.append_column("margin", pa.array([], pa.float64())) if margin else table


def _best(table: pa.Table, column: str, n: int) -> pa.Table:
    """The ``n`` rows of ``table`` with the largest ``column`` (ties by uri, so a report is repeatable)."""
    return table.sort_by([(column, "descending"), ("uri", "ascending")]).slice(0, n)


def _add_errors(table: pa.Table, errors: dict[str, ErrorKindSummary]) -> None:
    failed = table.filter(pc.equal(table["decided_by"], "error"))
    for uri, message, kind in zip(failed["uri"].to_pylist(), failed["error"].to_pylist(),
                                  failed["error_kind"].to_pylist()):
        summary = errors.setdefault(kind or "other", ErrorKindSummary())
        summary.count += 1
        if len(summary.examples) < _EXAMPLES:
            summary.examples.append((uri, message or ""))


def _read(loc: Location) -> bytes:
    if not loc.fs.exists(loc.path):
        raise UsageError(f"{loc.url} is missing: the output holds no finished ngt-ray run (run ngt-ray moderate "
                         "first, or let a stopped run finish)")
    [got] = fetch(loc.fs, [loc.path]).results  # retried and classified, as the job reads
    if isinstance(got, FetchError):
        raise OSError(f"{loc.url}: {got}")
    return got


def _read_stats(output: Location) -> dict[str, Any]:
    return pq.read_table(pa.BufferReader(_read(output.join("stats.parquet")))).to_pylist()[0]


def _read_json(loc: Location) -> dict[str, Any]:
    return json.loads(_read(loc))
