"""What crosses between the parts of a moderation job, declared once.

* ``ActorSpec``: what the plan hands every model actor, whole and frozen;
* ``DECODED_COLUMNS``: what the decode tasks hand the model actors (with ``--decode gpu`` the
  actors get the read stage's rows, without ``pixels``);
* ``Screened``: what the screen hands the confirmation, inside one model actor;
* ``FLAGS_SCHEMA``: what the user reads, one row per object;
* ``ERROR_KINDS``: what kind of failure an error row is, read from how its message starts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from ngt_ray.grouptesting.cost_table import StageCosts
from ngt_ray.grouptesting.group_size import GroupSize

if TYPE_CHECKING:  # the aggregator reads this module and stays torch-free
    from ngt_ray.nets.shapes import CallSizes

__all__ = ["DECODED_COLUMNS", "ERROR_KINDS", "FLAGS_SCHEMA", "ActorSpec", "Screened", "error_kind"]

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

# The kinds of error row, each with how its messages start. The readers (``ngt_ray.job.sources``,
# ``ngt_ray.job.fetch``) and the decoder (``ngt_ray.nets.decode``) write messages that start so;
# the flags carry the kind, and the stats count each (``errors_<kind>``). "other" is anything else.
ERROR_KINDS: dict[str, tuple[str, ...]] = {
    "not_a_file": ("symlink", "not a regular file", "folder cannot be listed", "file cannot be followed"),
    "read": ("read failed",),
    "too_large": ("too large",),
    "decode": ("decode failed", "empty object"),
    "other": (),
}


def error_kind(message: str) -> str:
    """The kind (a key of ``ERROR_KINDS``) of an error message; a retest's is its decode error's."""
    text = message.removeprefix("retest ")
    return next((kind for kind, starts in ERROR_KINDS.items() if starts and text.startswith(starts)), "other")


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
