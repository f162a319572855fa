"""The Ray Data stages of a moderation job: CPU decode tasks and the model actor.

One model actor holds both models. It screens a batch with group tests on cached embeddings,
confirms the candidates with the individual model right there, and emits the final flags rows:
cleared rows never leave the actor to reach a confirming model, no bytes travel between two
pools, and a GPU is not split between a busy screen and an idle confirmation.

Each stage catches per-image failures and emits them as rows (``max_errored_blocks`` would drop a
whole block), and times its phases (``ngt_ray.job.phases``) into the job's ledger.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from ngt_ray.errors import RowError
from ngt_ray.grouptesting.algorithms import screen
from ngt_ray.grouptesting.calibration import ScreenQuality
from ngt_ray.grouptesting.grouping import batch_rng, group_ids, key_hashes
from ngt_ray.grouptesting.planning import PrevalenceEstimate, group_size_that_pays
from ngt_ray.job.contracts import FLAGS_SCHEMA, ActorSpec, Screened, error_columns, errors_of
from ngt_ray.job.phases import DEVICE_PHASES, PhaseClock, round_phase
from ngt_ray.nets.checkpoint import ModelCard
from ngt_ray.nets.decode import MAX_DECODE_BYTES, decode_many, decode_on_device
from ngt_ray.nets.loading import load_model
from ngt_ray.nets.runtime import accelerate, compile_cache_hits, inference_context, pick_device
from ngt_ray.nets.shapes import CallSizes, ShapeLedger, fix_shapes, warm_up
from ngt_ray.storage import MAX_OBJECT_BYTES, redact

__all__ = ["FLAGS_SCHEMA", "ModelActor", "Moderator", "decode_batch", "decode_budget", "decode_memory",
           "model_actor_memory"]

# Private memory of a worker that runs decode tasks, before any work: Ray's worker with torch
# imported (measured 320-360 MiB with Ray 2.60, torch 2.14, CPython 3.11).
_DECODE_WORKER = 400 * 2**20
# Private memory of a model actor's worker with both models loaded and every call shape warmed
# (Ray Data measured up to 3.1 GiB for the default firearm models on a CPU).
_MODEL_WORKER = 3 * 2**30


def decode_budget(rows: int, size: int) -> int:
    """The most private memory (what Ray Data measures as a task's USS) one decode task of ``rows``
    images at ``size`` holds: its worker, the batch's pixels twice (decoded, and as the Arrow block
    handed on), one encoded object and the costliest decode of one image. The batch's encoded
    bytes stay in the object store (``decode_batch`` reads them one at a time), and a decode task
    runs in a worker that runs only decode tasks, so nothing another task left counts."""
    return _DECODE_WORKER + 2 * rows * size * size * 3 + MAX_OBJECT_BYTES + MAX_DECODE_BYTES


def decode_memory(rows: int, size: int) -> int:
    """The ``memory=`` a decode task reserves: its budget and the quarter more Ray Data asks for (it
    warns, "used X against a Y reservation", when a task's peak times 1.25 is over its reservation)."""
    return decode_budget(rows, size) * 5 // 4


def model_actor_memory(rows: int, size: int) -> int:
    """The ``memory=`` a model actor reserves: its worker with torch, both models and their warmed
    shapes, and a batch's pixels a few times over (the Arrow block, the tensor on the host, the
    confirmation's own decode), with Ray Data's quarter on top. Without it Ray Data counts the
    actor as needing nothing, schedules by CPU alone and warns once it sees what the actor uses."""
    return (_MODEL_WORKER + 4 * rows * size * size * 3) * 5 // 4


def decode_batch(batch: dict[str, np.ndarray] | pa.Table, size: int,
                 ledger=None) -> pa.Table | dict[str, np.ndarray]:
    """CPU decode to uint8 ``(size, size, 3)``; the encoded bytes ride along for confirmation.

    An Arrow batch (the job's) is decoded one object at a time straight from its column, and comes
    out as an Arrow table whose uri and bytes are the same buffers: besides the batch, which stays
    in the object store, the task holds the batch's pixels and one encoded image, whatever the
    objects' sizes (handing Ray the columns in a dict would copy every object's bytes twice). A
    numpy batch (a dict of arrays) comes out as a dict with the same columns.
    """
    clock = PhaseClock()
    clock.start_batch()
    with clock.phase("decode"):
        columns = _Columns(batch)
        pixels, errors = decode_many(columns.blobs(), size, channels_last=True)
        if columns.has("error"):  # the reader could not fetch these: its reason, not "empty object"
            read_errors = errors_of(columns.values("error"), columns.values("error_kind"))
            errors = [read_error or err for read_error, err in zip(read_errors, errors)]
        out = {"uri": columns.get("uri"), "bytes": columns.get("bytes"), "pixels": pixels, **error_columns(errors)}
        if columns.arrow:
            from ray.data.block import BlockAccessor

            out["pixels"] = BlockAccessor.batch_to_block({"pixels": pixels}).column("pixels")  # Ray's tensor type
            out["error"] = pa.array(out["error"], pa.string())
            out["error_kind"] = pa.array(out["error_kind"], pa.string())
            out = pa.table(out)
    if ledger is not None:
        ledger.add.remote(clock.finish_batch(len(errors)), "decode_tasks")
    return out


class _Blobs:
    """The encoded images of an Arrow column, each copied out only when the decoder comes to it."""

    def __init__(self, column: pa.ChunkedArray) -> None:
        self.column = column

    def __len__(self) -> int:
        return len(self.column)

    def __iter__(self) -> Iterator[bytes | None]:
        for chunk in self.column.chunks:
            for i in range(len(chunk)):
                yield chunk[i].as_py()


class _Columns:
    """The columns of a decode batch, Arrow or numpy, as the decode stage reads them."""

    def __init__(self, batch: dict[str, np.ndarray] | pa.Table) -> None:
        self.batch = batch
        self.arrow = isinstance(batch, pa.Table)

    def has(self, name: str) -> bool:
        return name in (self.batch.column_names if self.arrow else self.batch)

    def get(self, name: str) -> Any:
        """The column as it is (Arrow columns travel on without a copy)."""
        return self.batch.column(name) if self.arrow else self.batch[name]

    def values(self, name: str) -> Sequence[Any]:
        """The column's values, as Python objects from Arrow."""
        return self.batch.column(name).to_pylist() if self.arrow else self.batch[name]

    def blobs(self) -> _Blobs | list[bytes | None]:
        return _Blobs(self.batch.column("bytes")) if self.arrow else list(self.batch["bytes"])


class ModelActor:
    """Loads a model once per actor onto the actor's device, with the runtime levers on, and moves
    pixel batches there through a pinned staging buffer.

    Given the plan's closed set of call shapes (``calls``), the model is held to it and every shape
    runs once here, before the actor takes a batch: on a GPU a shape met for the first time costs
    seconds of cuDNN planning (and under ``--runtime compiled`` a compile), which would otherwise
    land in the middle of the stream. ``warmed`` says what that cost.
    """

    def __init__(self, model_path: str, device: str, threads: int, runtime: str = "fast",
                 stub: bool = False, calls: CallSizes | None = None) -> None:
        self.device = pick_device(device)
        if self.device.type == "cpu":
            torch.set_num_threads(max(1, threads))
        self.runtime = runtime
        self.warmed = {"warmup_seconds": 0.0, "compile_seconds": 0.0, "model_call_shapes": 0}
        self.ledgers: list[ShapeLedger] = []
        self.model, self.card = self._load(model_path, stub, calls)
        self._staging: torch.Tensor | None = None
        self._copied: torch.cuda.Event | None = None  # marks the end of the last copy out of ``_staging``

    def _load(self, path: str, stub: bool, calls: CallSizes | None) -> tuple[torch.nn.Module, ModelCard]:
        model, card = load_model(path, stub=stub, map_location=self.device)
        model = accelerate(model, self.device, card.input_size, self.runtime)[0]
        if calls is not None:
            ledger = fix_shapes(model, calls)
            # compiled: the first call compiles, and CUDA graphs record on a later one
            repeats = (3 if self.device.type == "cuda" else 2) if self.runtime == "compiled" else 1
            for name, value in warm_up(model, card.input_size, self.device, ledger,
                                       lambda: inference_context(self.device), repeats).items():
                self.warmed[name] += value
            self.ledgers.append(ledger)
        return model, card

    def shape_counters(self) -> dict[str, int]:
        """Cold calls, rows and padded rows of every model since warm-up."""
        totals: dict[str, int] = {}
        for ledger in self.ledgers:
            for name, value in ledger.counters().items():
                totals[name] = totals.get(name, 0) + value
        return totals

    def _to_device(self, pixels: np.ndarray | torch.Tensor) -> torch.Tensor:
        """uint8 pixels as an NCHW tensor on the model's device, channels-last in memory.

        Host arrays arrive as NHWC (Pillow's layout), so the permuted view *is* channels-last and
        no layout copy is made anywhere (convolutions take it as it is, on either device). On a
        GPU the host-to-device copy goes through a reused pinned buffer, so it is a non-blocking
        DMA rather than a staged pageable copy.
        """
        if isinstance(pixels, torch.Tensor):  # decoded on the device: NCHW already there
            x = pixels.to(self.device)
            return x.contiguous(memory_format=torch.channels_last) if self.device.type == "cuda" else x
        with warnings.catch_warnings():  # zero-copy from the Arrow block, which is read-only: only read here
            warnings.filterwarnings("ignore", "The given NumPy array is not writable", UserWarning)
            host = torch.from_numpy(np.ascontiguousarray(pixels))
        if self.device.type != "cuda":
            return host.permute(0, 3, 1, 2)
        if self._copied is not None:  # the last copy out of the buffer must be done before it is refilled
            self._copied.synchronize()
        if self._staging is None or self._staging.numel() < host.numel():
            self._staging = torch.empty(host.numel(), dtype=torch.uint8).pin_memory()
        staged = self._staging[: host.numel()].view(host.shape)
        staged.copy_(host)
        x = staged.to(self.device, non_blocking=True).permute(0, 3, 1, 2)
        self._copied = torch.cuda.Event()
        self._copied.record()
        return x


class Moderator(ModelActor):
    """Screens a batch with group tests and confirms its candidates: uri/bytes/pixels in, flags out.

    Every image is embedded once; the algorithm's rounds (Dorfman, halving, overlapping pools)
    score merged groups of those cached embeddings, one batched forward per round, so a halving
    retest pays only the shared stages. ``--group-size auto`` chooses k per batch from the measured
    stage costs, the card's per-size calibration and a running prevalence estimate. Candidates
    are decoded again from their bytes at the individual model's size and scored one by one.
    Without a screen model (the baseline), every image is a candidate.
    """

    def __init__(self, spec: ActorSpec) -> None:
        super().__init__(spec.individual_model, spec.device, spec.threads, spec.runtime, spec.stub_models,
                         spec.confirm_calls)
        self.spec = spec
        self.clock = PhaseClock(cuda=self.device.type == "cuda")
        self.screen_model = self.screen_card = self.quality = None
        if spec.screen_model is not None:
            self.screen_model, self.screen_card = self._load(spec.screen_model, spec.stub_models, spec.screen_calls)
            calibration = self.screen_card.calibration
            self.quality = ScreenQuality.from_card(calibration) if calibration else None
        self.prevalence = PrevalenceEstimate(prior=spec.prevalence_prior)
        self._reported = self.shape_counters()
        if spec.ledger is not None:
            hits = compile_cache_hits() if self.runtime == "compiled" else 0  # (imports dynamo: only then)
            spec.ledger.add_warmup.remote({**self.warmed, "compile_cache_hits": hits})

    def _counters_since_last_batch(self) -> dict[str, int]:
        now = self.shape_counters()
        delta = {name: value - self._reported.get(name, 0) for name, value in now.items()}
        self._reported = now
        return delta

    # -- the batch -----------------------------------------------------------------------------

    def __call__(self, table: pa.Table) -> pa.Table:
        """One Arrow batch in (``DECODED_COLUMNS``), its flags rows out. Columns are read lazily: the
        pixels zero-copy, the encoded bytes only for the rows that need them (a full numpy batch
        would copy every image's bytes into a Python object, ~25 us a row)."""
        self.clock.start_batch()
        batch = _Batch(table)
        n = len(batch.uri)
        pixels, errors = self._pixels(batch)
        ok = np.flatnonzero(np.array([not e for e in errors], dtype=bool))
        screened = Screened.empty(n, timed=self.spec.seconds is not None)
        k = self._choose_k() if self.screen_model is not None else None
        if k is None:  # no screen, or one that would cost more than confirming every image
            screened.candidate[ok] = True
        elif ok.size:
            self._screen(batch.uri, pixels, ok, screened, k)
        flagged = self._confirm(batch, pixels, errors, screened)
        with self.clock.phase("output"):
            table = _flags_table(batch.uri, flagged, errors, screened)
        record = self.clock.finish_batch(n)
        record["shapes"] = self._counters_since_last_batch()
        if self.device.type != "cuda":  # the CPU is the model's device: its busy time is the model phases'
            record["device_seconds"] = sum(record["wall"].get(p, 0.0) for p in DEVICE_PHASES)
        if self.spec.ledger is not None:
            self.spec.ledger.add.remote(record)
        return table

    def _pixels(self, batch: _Batch) -> tuple[np.ndarray | torch.Tensor, list[str | None]]:
        """The batch's pixels at the first model's size and the per-image errors."""
        read_errors = batch.errors()
        if batch.has("pixels"):  # decoded by the CPU decode tasks
            return batch.pixels(), read_errors
        size = (self.screen_card or self.card).input_size
        with self.clock.phase("decode"):  # bytes arrived undecoded: decode where the model runs
            pixels, errors = decode_on_device(batch.blobs(), size, self.device)
        # the reader could not fetch some: its reason, not "empty object"
        return pixels, [read_error or err for read_error, err in zip(read_errors, errors)]

    # -- the screen ----------------------------------------------------------------------------

    def _choose_k(self) -> int | None:
        """The group size for the next batch; with ``--group-size auto``, None where the cheapest k
        is still expected to cost more than the individual model on every image (a screen that
        passes most negative groups, or a prevalence too high to pay): then the batch is not screened."""
        if not self.spec.group_size.auto:
            return self.spec.group_size.k
        if self.quality is None:
            return self.screen_card.group_size
        costs = self.spec.seconds or self.spec.macs
        return group_size_that_pays(self.spec.algorithm, self.screen_card.calibrated_sizes, self.prevalence.value,
                                    costs, self.quality, self.spec.min_size)

    def _screen(self, uris: np.ndarray, pixels: np.ndarray | torch.Tensor, ok: np.ndarray,
                out: Screened, k: int) -> None:
        """Run the algorithm with groups of ``k`` over the ``ok`` rows and fill their part of ``out``."""
        subset = pixels if ok.size == len(pixels) else pixels[ok]
        with self.clock.phase("to_device"):
            x = self._to_device(subset)
        with self.clock.phase("embed"), inference_context(self.device):
            h = self.screen_model.embed(x)
        rounds = 0

        def score(groups: list[np.ndarray]) -> np.ndarray:
            nonlocal rounds
            rounds += 1
            with self.clock.phase(round_phase(rounds)), inference_context(self.device):
                idx = torch.from_numpy(np.concatenate(groups)).to(self.device, non_blocking=True)
                logits = self.screen_model.score_groups(h[idx], [len(g) for g in groups])
                return torch.sigmoid(logits.float()).cpu().numpy()

        card, costs = self.screen_card, self.spec
        with self.clock.phase("bookkeeping"):
            first_key = str(uris[ok[0]]).removeprefix(self.spec.input_root)  # the same wherever the bucket lives
            result = screen(self.spec.algorithm, ok.size, k, batch_rng(self.spec.seed, first_key), score,
                            card.threshold_for, self.spec.min_size)
            sizes = np.fromiter(map(len, result.groups), dtype=np.int64, count=len(result.groups))
            members = np.concatenate(result.groups)
            rows = ok[members]
            out.group_id[rows] = np.repeat(group_ids(key_hashes(uris[ok]), members, sizes), sizes)
            out.group_size[rows] = np.repeat(sizes, sizes)
            out.group_score[ok] = result.group_score
            out.score[ok] = result.score
            out.tests[ok] = result.tests
            out.compute_macs[ok] = costs.macs.embed + result.cost(costs.macs.group_cost)
            if costs.seconds is not None:
                out.compute_seconds[ok] = costs.seconds.embed + result.cost(costs.seconds.group_cost)
            out.candidate[ok] = result.candidate
            out.cleared_in_round_one[ok] = result.decided_in_round_one
            if self.quality is not None:
                first = result.group_score[members[np.cumsum(sizes) - sizes]]
                distinct, which = np.unique(sizes, return_inverse=True)
                positive = int((first >= np.array([card.threshold_for(int(s)) for s in distinct])[which]).sum())
                self.prevalence.update(k, len(sizes), positive, self.quality)

    # -- the confirmation ----------------------------------------------------------------------

    def _confirm(self, batch: _Batch, pixels: np.ndarray | torch.Tensor, errors: list[str | None],
                 screened: Screened) -> np.ndarray:
        """Score the candidates with the individual model; returns ``flagged`` and updates
        ``screened`` (score, compute) and ``errors`` in place."""
        todo = np.flatnonzero(screened.candidate)
        flagged = np.zeros(len(errors), dtype=bool)
        if not todo.size:
            return flagged
        with self.clock.phase("confirm"):
            if self.screen_model is None:  # no screen: the pixels are already at this model's size
                candidates, decode_errors = (pixels if todo.size == len(pixels) else pixels[todo]), [None] * todo.size
            elif self.spec.decode_here:
                candidates, decode_errors = decode_on_device(batch.blobs(todo), self.card.input_size,
                                                             self.device)
            else:
                candidates, decode_errors = decode_many(batch.blobs(todo), self.card.input_size,
                                                        channels_last=True)
            with inference_context(self.device):
                logits = self.model(self._to_device(candidates))
            scores = torch.sigmoid(logits.float()).cpu().numpy()
        screened.score[todo] = scores
        flagged[todo] = scores >= self.card.threshold
        screened.compute_macs[todo] += self.spec.macs.confirm
        screened.compute_seconds[todo] += self.spec.seconds.confirm if self.spec.seconds is not None else np.nan
        for i, err in zip(todo, decode_errors):
            if err is not None:  # after a screen, a changed or vanished object
                errors[i] = err.prefixed("retest ") if screened.group_id[i] >= 0 else err
                flagged[i] = False
        return flagged


class _Batch:
    """Columns of an Arrow batch, converted only when asked for."""

    def __init__(self, table: pa.Table) -> None:
        self.table = table
        self.uri = np.array(table.column("uri").to_pylist(), dtype=object)

    def has(self, name: str) -> bool:
        return name in self.table.column_names

    def errors(self) -> list[RowError | None]:
        """Per row the reader's or decoder's error, None when fine."""
        if not self.has("error"):
            return [None] * self.table.num_rows
        return errors_of(self.table.column("error").to_pylist(), self.table.column("error_kind").to_pylist())

    def pixels(self) -> np.ndarray:
        """The pixel column as one array: zero-copy from a single block."""
        chunks = [chunk.to_numpy(zero_copy_only=False) for chunk in self.table.column("pixels").chunks]
        return chunks[0] if len(chunks) == 1 else np.concatenate(chunks)

    def blobs(self, rows: Sequence[int] | None = None) -> list[bytes | None]:
        """The encoded bytes of ``rows`` (default: all)."""
        column = self.table.column("bytes")
        return column.to_pylist() if rows is None else [column[int(i)].as_py() for i in rows]


def _flags_table(uris: np.ndarray, flagged: np.ndarray, errors: list[RowError | None], s: Screened) -> pa.Table:
    """The final rows of a batch, in ``FLAGS_SCHEMA``; error messages as people may read them."""
    is_error = np.array([e is not None for e in errors], dtype=bool)
    decided_by = np.where(is_error, "error", np.where(
        s.candidate, "retest", np.where(s.cleared_in_round_one, "group", "subgroup")))
    no_group = s.group_id < 0
    spent = ~no_group | s.candidate  # rows some model ran on carry their compute
    return pa.table(
        {
            "uri": pa.array(uris, pa.string()),
            "flagged": pa.array(flagged & ~is_error),
            "score": pa.array(s.score, pa.float32(), mask=is_error | np.isnan(s.score)),
            "group_id": pa.array(s.group_id, pa.int64(), mask=no_group),
            "group_size": pa.array(s.group_size, pa.int16(), mask=no_group),
            "group_score": pa.array(s.group_score, pa.float32(), mask=np.isnan(s.group_score)),
            "decided_by": pa.array(decided_by, pa.string()),
            "tests": pa.array(s.tests, pa.float32(), mask=no_group),
            "compute_macs": pa.array(s.compute_macs, pa.float64(), mask=~spent),
            "compute_seconds": pa.array(s.compute_seconds, pa.float64(), mask=~spent | np.isnan(s.compute_seconds)),
            "error": pa.array([None if e is None else redact(e.message) for e in errors], pa.string()),
            "error_kind": pa.array([None if e is None else e.kind.value for e in errors], pa.string()),
        },
        schema=FLAGS_SCHEMA,
    )
