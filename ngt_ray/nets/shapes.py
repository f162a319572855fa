"""A closed set of batch shapes per model, warmed once when an actor starts.

Group testing calls a network with a different number of rows almost every time: the groups of a
round, the halves of a retest, the candidates to confirm. On a GPU each new input shape costs cuDNN
its planning (about 1.9 s of CPU measured on an H200 against 5-28 ms for a repeat), and under
``torch.compile`` with static shapes a compile. So the plan fixes, per model, the row counts a call
may have (``CallSizes``): per-image stages at one size, everything else on a ladder of sizes a third
apart. A call is padded up to the next rung, or split at the top one. ``warm_up`` runs every shape
of the set before the actor takes its first batch, and a ``ShapeLedger`` counts every call after it
whose shape was not warmed (``cold_calls``; the target is 0). The same code runs on the CPU, where
a cold call costs little, so the counters are tested without a GPU.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

__all__ = ["CallSizes", "ShapeLedger", "fix_shapes", "size_ladder", "warm_up"]


def size_ladder(top: int) -> tuple[int, ...]:
    """``1, 2, 3, 4, 6, 8, 12, 16, ...`` up to ``top`` (included): powers of two and the midpoints
    between them, so at most a third of a padded call is padding, while the number of shapes grows
    only as 2 log2(top)."""
    if top < 1:
        raise ValueError(f"the largest call must have at least one row, got {top}")
    rungs, p = {top}, 1
    while p < top:
        rungs.update(r for r in (p, p + p // 2) if r < top)
        p *= 2
    return tuple(sorted(rungs))


@dataclass(frozen=True)
class CallSizes:
    """The row counts one model is ever called with.

    ``per_image``: rows of every call on raw pixels (a screen's per-image stages), so a batch is
    embedded in equal pieces; ``None`` puts those calls on the ladder too (the confirming model,
    whose calls are as many as the candidates). ``ladder``: rows of every other call (merged groups,
    halving rounds, confirmations); calls above its top are split into top-sized pieces.
    """

    ladder: tuple[int, ...]
    per_image: int | None = None

    @classmethod
    def up_to(cls, top: int, per_image: bool = False) -> CallSizes:
        return cls(size_ladder(top), top if per_image else None)

    def pieces(self, n: int, raw_pixels: bool) -> Iterator[tuple[int, int, int]]:
        """``(first row, rows, padded rows)`` of each piece a call of ``n`` rows is made of."""
        top = self.per_image if raw_pixels and self.per_image else self.ladder[-1]
        for lo in range(0, n, top):
            rows = min(top, n - lo)
            yield lo, rows, top if raw_pixels and self.per_image else next(r for r in self.ladder if r >= rows)

    def shapes(self) -> int:
        """Row counts in the set."""
        return len(set(self.ladder) | ({self.per_image} if self.per_image else set()))


@dataclass
class ShapeLedger:
    """Every call shape a model met, whether it was warmed, and the rows padding added.

    A key is ``(first stage, stop stage, input shape)``: the same stages at the same shape reuse
    cuDNN's plans and a compiled graph, anything else pays again.
    """

    sizes: CallSizes
    seen: set[tuple] = field(default_factory=set)
    warm: frozenset[tuple] | None = None  # sealed by ``warm_up``
    cold_calls: int = 0
    rows: int = 0  # rows asked for after warm-up
    padded_rows: int = 0  # rows added to reach a size of the set

    def call(self, fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, key: tuple) -> torch.Tensor:
        """``fn(x)`` with ``x`` padded (zero rows, sliced off again) or split to sizes of the set."""
        out = []
        raw = x.dtype == torch.uint8
        for lo, rows, padded in self.sizes.pieces(x.shape[0], raw):
            piece = x[lo:lo + rows]
            if padded > rows:
                fill = piece.new_zeros((padded - rows, *piece.shape[1:]))
                piece = torch.cat([piece, fill]).contiguous(memory_format=_layout(piece))
            self._note((*key, tuple(piece.shape)), rows, padded)
            out.append(fn(piece)[:rows])
        return out[0] if len(out) == 1 else torch.cat(out)

    def _note(self, key: tuple, rows: int, padded: int) -> None:
        self.seen.add(key)
        if self.warm is None:
            return
        self.rows += rows
        self.padded_rows += padded - rows
        if key not in self.warm:
            self.cold_calls += 1

    def seal(self) -> None:
        """What has been called so far is the warm set; later calls outside it are cold."""
        self.warm = frozenset(self.seen)

    def counters(self) -> dict[str, int]:
        """What a batch record carries: cold calls, rows and padding since warm-up."""
        return {"cold_model_calls": self.cold_calls, "model_call_rows": self.rows, "padded_rows": self.padded_rows}


def _layout(x: torch.Tensor) -> torch.memory_format:
    return torch.channels_last if x.dim() == 4 and x.is_cuda else torch.contiguous_format


def fix_shapes(model: nn.Module, sizes: CallSizes) -> ShapeLedger:
    """Hold every call of ``model`` to ``sizes``: the ledger goes where the model's calls pass
    (a staged backbone's ``forward_range``, or a stand-in's own calls)."""
    target = getattr(model, "backbone", model)
    if not hasattr(target, "shapes"):
        raise TypeError(f"{type(model).__name__} has no call site for fixed shapes")
    target.shapes = ShapeLedger(sizes)
    return target.shapes


def warm_up(model: nn.Module, input_size: int, device: torch.device, ledger: ShapeLedger,
            context: Callable[[], object], repeats: int = 1) -> dict[str, float]:
    """Run every shape of ``ledger``'s set ``repeats`` times, then seal the set.

    A screen (``sizes.per_image`` set) embeds one per-image piece and scores groups of one at every
    rung, which takes every stage range a merge design runs at every size of the ladder; a confirming
    model scores each rung of images. Returns the seconds it took, and, when calls compile
    (``repeats`` > 1), the compile seconds: each shape's first call less its last.
    """
    sizes = ledger.sizes
    x = torch.zeros((max(sizes.ladder[-1], sizes.per_image or 0), 3, input_size, input_size), dtype=torch.uint8,
                    device=device)
    if device.type == "cuda":
        x = x.contiguous(memory_format=torch.channels_last)
    start, compile_seconds = time.perf_counter(), 0.0

    def timed(call: Callable[[], torch.Tensor]) -> torch.Tensor:
        nonlocal compile_seconds
        seconds = []
        for _ in range(repeats):
            t = time.perf_counter()
            out = call()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            seconds.append(time.perf_counter() - t)
        if repeats > 1:
            compile_seconds += max(0.0, seconds[0] - seconds[-1])
        return out

    with context():
        if sizes.per_image:
            h = timed(lambda: model.embed(x[:sizes.per_image]))
            for rows in sizes.ladder:
                one = h[:1].expand(rows, *h.shape[1:]).contiguous(memory_format=_layout(h))
                timed(lambda one=one, rows=rows: model.score_groups(one, [1] * rows))
        else:
            for rows in sizes.ladder:
                timed(lambda rows=rows: model(x[:rows]))
    ledger.seal()
    return {"warmup_seconds": time.perf_counter() - start, "compile_seconds": compile_seconds,
            "model_call_shapes": len(ledger.warm)}
