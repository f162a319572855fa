"""What went wrong with one object, as a value: a kind and a message, made where it failed.

Every object gives one row, and a row that could not be scored says why (``error``) and what kind
of failure it was (``error_kind``). The kind is decided by the code that met the failure (the
listing, the reader, the decoder) and travels beside the message in its own column, so rewording
a message never moves it to another kind. Below every layer, so storage, decode and the job share it.
"""

from __future__ import annotations

from enum import StrEnum
from typing import NamedTuple

__all__ = ["ErrorKind", "RowError"]


class ErrorKind(StrEnum):
    """The kinds of error row; the stats count each (``errors_<kind>``)."""

    NOT_A_FILE = "not_a_file"  # a dangling symlink, a link to a folder, a FIFO or socket, an unlistable folder
    READ = "read"  # could not be read (after the fetch layer's retries)
    TOO_LARGE = "too_large"  # an object over the byte limit, or an image over the pixel limit
    DECODE = "decode"  # empty, truncated, not an image
    OTHER = "other"


class RowError(NamedTuple):
    """One object's failure: its kind and what a person reads."""

    kind: ErrorKind
    message: str

    def __str__(self) -> str:
        return self.message

    def prefixed(self, prefix: str) -> RowError:
        """The same failure met again in a later step (a retest's decode), named so."""
        return RowError(self.kind, f"{prefix}{self.message}")
