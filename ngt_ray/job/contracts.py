"""What crosses between the parts of a moderation job, declared once.

* ``ActorSpec``: what the plan hands every model actor, whole and frozen;
* ``DECODED_COLUMNS``: what the decode tasks hand the model actors (with ``--decode gpu`` the
  actors get the read stage's rows, without ``pixels``);
* ``Screened``: what the screen hands the confirmation, inside one model actor;
* ``FLAGS_SCHEMA``: what the user reads, one row per object;
* ``error_columns`` / ``errors_of``: per-row errors (``ngt_ray.errors.RowError``) as the two
  string columns that carry them between stages, and back.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from ngt_ray.errors import ErrorKind, RowError
from ngt_ray.grouptesting.cost_table import StageCosts
from ngt_ray.grouptesting.group_size import GroupSize

if TYPE_CHECKING:  # the aggregator reads this module and stays torch-free
    from ngt_ray.nets.shapes import CallSizes

__all__ = ["DECODED_COLUMNS", "FLAGS_SCHEMA", "ActorSpec", "Screened", "error_columns", "errors_of"]

@dataclass(frozen=True)
class ActorSpec:
    """What every model actor needs, handed over whole."""

    individual_model: str
    screen_model: str | None  # None: no screen, every image is confirmed (the baseline)
    algorithm: str
    group_size: GroupSize
    seed: int
    min_size: int
    prevalence_prior: float
    macs: StageCosts
    seconds: StageCosts | None
    device: str
    threads: int
    runtime: str
    decode_here: bool
    stub_models: bool = False
    input_root: str = ""  # URL prefix of every input object: group seeds use keys relative to it
    # the closed set of call shapes of each model, warmed when the actor starts (ngt_ray.nets.shapes)
    screen_calls: CallSizes | None = None
    confirm_calls: CallSizes | None = None
    ledger: Any = None  # the job's PhaseLedger actor, set when the job starts


DECODED_COLUMNS = {
    "uri": "str: the object's full URL (packed inputs: container#key)",
    "bytes": "bytes: the encoded image, kept for the confirmation's own decode at its input size",
    "pixels": "uint8 (H, W, 3) at the screen's input size (the individual model's without a screen)",
    "error": 'str: why the object could not be decoded; "" when fine (an all-null column loses its type)',
    "error_kind": "str: that error's kind (ngt_ray.errors.ErrorKind), decided where it failed; \"\" when fine",
}

FLAGS_SCHEMA = pa.schema(
    [
        ("uri", pa.string()),
        ("flagged", pa.bool_()),
        ("score", pa.float32()),
        ("group_id", pa.int64()),
        ("group_size", pa.int16()),
        ("group_score", pa.float32()),
        ("decided_by", pa.string()),
        ("tests", pa.float32()),
        ("compute_macs", pa.float64()),
        ("compute_seconds", pa.float64()),
        ("error", pa.string()),
        ("error_kind", pa.string()),
    ]
)

def error_columns(errors: Sequence[RowError | None]) -> dict[str, np.ndarray]:
    """The ``error`` and ``error_kind`` columns of per-row errors: "" where a row is fine (between
    stages an all-None column loses its string type)."""
    return {"error": np.array([e.message if e else "" for e in errors], dtype=object),
            "error_kind": np.array([e.kind.value if e else "" for e in errors], dtype=object)}


def errors_of(messages: Iterable[str | None], kinds: Iterable[str | None]) -> list[RowError | None]:
    """Per-row errors back from their two columns (``error_columns``, or null where fine)."""
    return [RowError(ErrorKind(kind), str(message)) if message else None for message, kind in zip(messages, kinds)]


@dataclass
class Screened:
    """Per row of a batch (arrays of length n): the screen's verdict and what it cost.

    Rows without a first-round group (``group_id < 0``: errors, or no screen at all) carry no
    screening share. ``candidate`` rows go to the individual model; all others are final.
    """

    candidate: np.ndarray  # bool
    cleared_in_round_one: np.ndarray  # bool
    group_id: np.ndarray  # int64, -1 for none
    group_size: np.ndarray  # int16, 0 for none
    group_score: np.ndarray  # float32, nan for none
    score: np.ndarray  # float32: score of the last test the row took part in
    tests: np.ndarray  # float32: share of the group tests
    compute_macs: np.ndarray  # float64: share of the screening MACs
    compute_seconds: np.ndarray  # float64: share of the screening seconds (nan when untimed)

    @classmethod
    def empty(cls, n: int, timed: bool) -> Screened:
        """Nothing screened yet: no groups, no candidates, no cost."""
        return cls(
            candidate=np.zeros(n, dtype=bool), cleared_in_round_one=np.zeros(n, dtype=bool),
            group_id=np.full(n, -1, dtype=np.int64), group_size=np.zeros(n, dtype=np.int16),
            group_score=np.full(n, np.nan, dtype=np.float32), score=np.full(n, np.nan, dtype=np.float32),
            tests=np.zeros(n, dtype=np.float32), compute_macs=np.zeros(n, dtype=np.float64),
            compute_seconds=np.zeros(n, dtype=np.float64) if timed else np.full(n, np.nan),
        )
