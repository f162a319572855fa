"""The Ray Data stages of a moderation job: decode, group screen, individual confirmation.

Each stage catches per-image failures and emits them as rows (``max_errored_blocks`` would drop a
whole block). The model stages are callable classes, so each actor loads its model once.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import torch

from ngt_ray.algorithms import screen
from ngt_ray.checkpoint import load_checkpoint
from ngt_ray.costs import StageCosts
from ngt_ray.decode import decode_many, decode_on_device
from ngt_ray.grouping import batch_rng, group_id
from ngt_ray.planning import PrevalenceEstimate, ScreenQuality, choose_group_size
from ngt_ray.runtime import accelerate, inference_context, pick_device

__all__ = ["FLAGS_SCHEMA", "Confirm", "GroupScreen", "ModelActor", "as_candidates", "decode_batch"]

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
    ]
)


def decode_batch(batch: dict[str, np.ndarray], size: int) -> dict[str, np.ndarray]:
    """CPU decode to uint8 ``(3, size, size)``; the encoded bytes ride along for confirmation."""
    pixels, errors = decode_many(list(batch["bytes"]), size)
    return {
        "uri": batch["uri"],
        "bytes": batch["bytes"],
        "pixels": pixels,
        # "" rather than None between stages: an all-None column loses its string type in transit
        "error": np.array([e or "" for e in errors], dtype=object),
    }


class ModelActor:
    """Loads a checkpoint once per actor onto the actor's device, with the runtime levers on."""

    def __init__(self, model_path: str, device: str, threads: int, runtime: str = "fast",
                 decode_here: bool = False) -> None:
        self.device = pick_device(device)
        self.decode_here = decode_here
        if self.device.type == "cpu":
            torch.set_num_threads(max(1, threads))
        model, self.card = load_checkpoint(model_path, map_location=self.device)
        self.model, self.levers = accelerate(model, self.device, self.card.input_size, runtime)

    def _to_device(self, pixels: np.ndarray | torch.Tensor) -> torch.Tensor:
        x = torch.as_tensor(np.ascontiguousarray(pixels) if isinstance(pixels, np.ndarray) else pixels)
        x = x.to(self.device, non_blocking=True)
        return x.contiguous(memory_format=torch.channels_last) if self.device.type == "cuda" else x

    def _decode(self, blobs: list[bytes], size: int) -> tuple[np.ndarray | torch.Tensor, list[str | None]]:
        """Pixels of ``blobs`` at ``size``: batched on the actor's device (nvJPEG on a GPU) when
        this actor decodes, else by Pillow on the CPU."""
        if self.decode_here:
            return decode_on_device(blobs, size, self.device)
        return decode_many(blobs, size)


def as_candidates(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """No screen (``--algorithm individual``): every image goes to the individual model, the
    baseline that group testing is measured against, through the same input path."""
    n = len(batch["uri"])
    out = {key: batch[key] for key in ("uri", "bytes", "error", "pixels") if key in batch}
    if "error" not in out:  # decoded by the model actor later
        out["error"] = np.array([""] * n, dtype=object)
    return {
        **out, "candidate": np.array([not e for e in out["error"]], dtype=bool),
        "cleared_in_round_one": np.zeros(n, dtype=bool), "group_id": np.full(n, -1, dtype=np.int64),
        "group_size": np.zeros(n, dtype=np.int16), "group_score": np.full(n, np.nan, dtype=np.float32),
        "score": np.full(n, np.nan, dtype=np.float32), "tests": np.zeros(n, dtype=np.float32),
        "compute_macs": np.zeros(n, dtype=np.float64), "compute_seconds": np.zeros(n, dtype=np.float64),
    }


class GroupScreen(ModelActor):
    """Screens a batch with group tests: every image is embedded once, then the algorithm's rounds
    (Dorfman, halving or overlapping pools) score merged groups of those cached embeddings, so a
    halving retest pays only the shared stages.

    ``group_size=None`` chooses k per batch from the measured stage costs, the card's per-size
    calibration and a running prevalence estimate. Emits per image its first-round group, the
    score of its last test, its share of the screening compute, and keeps the encoded bytes only
    for candidates (the only rows the confirmation stage decodes again).
    """

    def __init__(self, model_path: str, algorithm: str, group_size: int | None, seed: int,
                 macs: StageCosts, seconds: StageCosts | None = None, min_size: int = 1,
                 prevalence_prior: float = 0.01, device: str = "auto", threads: int = 1,
                 runtime: str = "fast", decode_here: bool = False) -> None:
        super().__init__(model_path, device, threads, runtime, decode_here)
        self.algorithm, self.group_size, self.seed, self.min_size = algorithm, group_size, seed, min_size
        self.macs, self.seconds = macs, seconds
        self.quality = ScreenQuality.from_card(self.card.calibration) if self.card.calibration else None
        self.prevalence = PrevalenceEstimate(prior=prevalence_prior)

    def _choose_k(self) -> int:
        if self.group_size is not None:
            return self.group_size
        if self.quality is None:
            return self.card.group_size
        costs = self.seconds or self.macs
        return choose_group_size(self.algorithm, self.card.calibrated_sizes, self.prevalence.value, costs,
                                 self.quality, self.min_size)

    def _scorer(self, h: torch.Tensor):
        def score(groups: list[np.ndarray]) -> np.ndarray:
            idx = torch.from_numpy(np.concatenate(groups)).to(self.device)
            with inference_context(self.device):
                logits = self.model.score_groups(h[idx], [len(g) for g in groups])
            return torch.sigmoid(logits.float()).cpu().numpy()

        return score

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(batch["uri"])
        if self.decode_here:  # bytes arrived undecoded: decode where the model runs
            pixels, errors = self._decode(list(batch["bytes"]), self.card.input_size)
            batch = {**batch, "pixels": pixels, "error": np.array([e or "" for e in errors], dtype=object)}
        ok = np.flatnonzero(np.array([not e for e in batch["error"]], dtype=bool))
        gid = np.full(n, -1, dtype=np.int64)
        gsize = np.zeros(n, dtype=np.int16)
        gscore = np.full(n, np.nan, dtype=np.float32)
        score = np.full(n, np.nan, dtype=np.float32)
        tests = np.zeros(n, dtype=np.float32)
        macs = np.zeros(n, dtype=np.float64)
        seconds = np.zeros(n, dtype=np.float64) if self.seconds else np.full(n, np.nan)
        candidate = np.zeros(n, dtype=bool)
        round_one = np.zeros(n, dtype=bool)
        if ok.size:
            k = self._choose_k()
            with inference_context(self.device):
                h = self.model.embed(self._to_device(batch["pixels"][ok]))
            result = screen(self.algorithm, ok.size, k, batch_rng(self.seed, batch["uri"][ok[0]]), self._scorer(h),
                            self.card.threshold_for, self.min_size)
            for members in result.groups:
                rows = ok[members]
                gid[rows] = group_id([batch["uri"][i] for i in rows])
                gsize[rows] = len(members)
            gscore[ok] = result.group_score
            score[ok] = result.score
            tests[ok] = result.tests
            macs[ok] = self.macs.embed + result.cost(self.macs.group_cost)
            if self.seconds:
                seconds[ok] = self.seconds.embed + result.cost(self.seconds.group_cost)
            candidate[ok] = result.candidate
            round_one[ok] = result.decided_in_round_one
            if self.quality is not None:
                positive = sum(1 for g in result.groups if result.group_score[g[0]] >= self.card.threshold_for(len(g)))
                self.prevalence.update(k, len(result.groups), positive, self.quality)
        keep = np.array([b if c else b"" for b, c in zip(batch["bytes"], candidate)], dtype=object)
        return {
            "uri": batch["uri"], "bytes": keep, "error": batch["error"], "candidate": candidate,
            "cleared_in_round_one": round_one, "group_id": gid, "group_size": gsize, "group_score": gscore,
            "score": score, "tests": tests, "compute_macs": macs, "compute_seconds": seconds,
        }


class Confirm(ModelActor):
    """The last round: candidates are scored one by one by the individual model; every other row
    passes through. Emits the final flags rows."""

    def __init__(self, model_path: str, macs: float, seconds: float | None = None, device: str = "auto",
                 threads: int = 1, runtime: str = "fast", decode_here: bool = False) -> None:
        super().__init__(model_path, device, threads, runtime, decode_here)
        self.threshold = self.card.threshold
        self.size = self.card.input_size
        self.macs, self.seconds = macs, seconds

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        errors = [e or None for e in batch["error"]]
        score = batch["score"].astype(np.float32)
        macs = batch["compute_macs"].astype(np.float64)
        seconds = batch["compute_seconds"].astype(np.float64)
        todo = [i for i in np.flatnonzero(batch["candidate"]) if errors[i] is None]
        flagged = np.zeros(len(errors), dtype=bool)
        if todo:
            if "pixels" in batch:  # no screen ran: the decode stage's pixels, at this model's size
                pixels, decode_errors = batch["pixels"][todo], [None] * len(todo)
            else:
                pixels, decode_errors = self._decode([batch["bytes"][i] for i in todo], self.size)
            with inference_context(self.device):
                logits = self.model(self._to_device(pixels))
            score[todo] = torch.sigmoid(logits.float()).cpu().numpy()
            flagged[todo] = score[todo] >= self.threshold
            macs[todo] += self.macs
            seconds[todo] += self.seconds if self.seconds is not None else np.nan
            for i, err in zip(todo, decode_errors):
                if err is not None:  # after a screen, a changed or vanished object
                    errors[i] = f"retest {err}" if batch["group_id"][i] >= 0 else err
        is_error = np.array([e is not None for e in errors], dtype=bool)
        retested = np.zeros(len(errors), dtype=bool)
        retested[todo] = True
        decided_by = np.where(is_error, "error", np.where(
            retested, "retest", np.where(batch["cleared_in_round_one"], "group", "subgroup")))
        no_group = batch["group_id"] < 0
        spent = ~no_group | retested  # rows some model ran on carry their compute
        return pa.table(
            {
                "uri": pa.array(batch["uri"], pa.string()),
                "flagged": pa.array(flagged & ~is_error),
                "score": pa.array(score, pa.float32(), mask=is_error | np.isnan(score)),
                "group_id": pa.array(batch["group_id"], pa.int64(), mask=no_group),
                "group_size": pa.array(batch["group_size"], pa.int16(), mask=no_group),
                "group_score": pa.array(batch["group_score"], pa.float32(), mask=np.isnan(batch["group_score"])),
                "decided_by": pa.array(decided_by, pa.string()),
                "tests": pa.array(batch["tests"], pa.float32(), mask=no_group),
                "compute_macs": pa.array(macs, pa.float64(), mask=~spent),
                "compute_seconds": pa.array(seconds, pa.float64(), mask=~spent | np.isnan(seconds)),
                "error": pa.array(errors, pa.string()),
            },
            schema=FLAGS_SCHEMA,
        )
