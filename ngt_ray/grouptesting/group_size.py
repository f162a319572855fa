"""The group size a job asks for, as one value: a fixed k, ``auto``, or ``none``.

Every layer reads the same value: the CLI parses it, the plan decides from it, the model actors
act on it and the stats print it (``str`` gives ``"8"``, ``"auto"`` or ``"none"``), so no layer
invents its own code for "chosen per batch" or "not screened".
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

__all__ = ["GroupSize"]

Mode = Literal["fixed", "auto", "none"]


@dataclass(frozen=True)
class GroupSize:
    """``fixed``: groups of ``k``. ``auto``: k chosen per batch from the measured costs, the screen's
    calibration and a running prevalence estimate, or no screen for a batch where none would pay.
    ``none``: no group test at all; every image goes through the individual model (the baseline)."""

    mode: Mode
    k: int = 0

    AUTO: ClassVar[GroupSize]
    NONE: ClassVar[GroupSize]

    def __post_init__(self) -> None:
        if self.mode not in ("fixed", "auto", "none"):
            raise ValueError(f"group size mode must be fixed, auto or none, got {self.mode!r}")
        if (self.mode == "fixed") != (self.k >= 1):
            raise ValueError(f"group size must be a positive integer, 'auto' or 'none', got {self.k}")

    @classmethod
    def fixed(cls, k: int) -> GroupSize:
        return cls("fixed", int(k))

    @classmethod
    def parse(cls, value: str | int | GroupSize) -> GroupSize:
        """``8``, ``"8"``, ``"auto"`` or ``"none"``; anything else is a ``ValueError`` that says
        what is accepted."""
        if isinstance(value, GroupSize):
            return value
        text = str(value).strip().lower()
        if text in ("auto", "none"):
            return cls(text)  # type: ignore[arg-type]
        try:
            k = int(text)
        except ValueError:
            k = 0
        if k < 1 or isinstance(value, bool):
            raise ValueError(f"group size must be a positive integer, 'auto' or 'none', got {value!r}")
        return cls.fixed(k)

    @property
    def screened(self) -> bool:
        """Whether images are group-tested at all."""
        return self.mode != "none"

    @property
    def auto(self) -> bool:
        return self.mode == "auto"

    def __str__(self) -> str:
        return str(self.k) if self.mode == "fixed" else self.mode


GroupSize.AUTO = GroupSize("auto")
GroupSize.NONE = GroupSize("none")
