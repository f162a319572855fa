"""The Ray Data stages of a moderation job: decode, group screen, individual retest.

Each stage catches per-image failures and emits them as rows (``max_errored_blocks`` would drop a
whole block). The model stages are callable classes, so each actor loads its model once.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import torch

from ngt_ray.checkpoint import load_checkpoint
from ngt_ray.decode import decode_many
from ngt_ray.grouping import batch_rng, dorfman_decide, form_groups, group_id
from ngt_ray.runtime import inference_context, pick_device

__all__ = ["decode_batch", "GroupScreen", "Retest", "FLAGS_SCHEMA"]

FLAGS_SCHEMA = pa.schema(
    [
        ("uri", pa.string()),
        ("flagged", pa.bool_()),
        ("score", pa.float32()),
        ("group_id", pa.int64()),
        ("group_size", pa.int16()),
        ("group_score", pa.float32()),
        ("decided_by", pa.string()),
        ("error", pa.string()),
    ]
)


def decode_batch(batch: dict[str, np.ndarray], size: int) -> dict[str, np.ndarray]:
    """CPU decode to uint8 ``(3, size, size)``; the encoded bytes ride along for retests."""
    pixels, errors = decode_many(list(batch["bytes"]), size)
    return {
        "uri": batch["uri"],
        "bytes": batch["bytes"],
        "pixels": pixels,
        # "" rather than None between stages: an all-None column loses its string type in transit
        "error": np.array([e or "" for e in errors], dtype=object),
    }


class _ModelActor:
    """Loads a checkpoint once per actor onto the actor's device."""

    def __init__(self, model_path: str, device: str, threads: int) -> None:
        self.device = pick_device(device)
        if self.device.type == "cpu":
            torch.set_num_threads(max(1, threads))
        self.model, self.card = load_checkpoint(model_path, map_location=self.device)
        if self.device.type == "cuda":
            self.model = self.model.to(memory_format=torch.channels_last)

    def _to_device(self, pixels: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(np.ascontiguousarray(pixels)).to(self.device, non_blocking=True)
        return x.contiguous(memory_format=torch.channels_last) if self.device.type == "cuda" else x


class GroupScreen(_ModelActor):
    """Round one: groups of k images in a seeded random order, one forward pass per group.

    Emits per image its group's id, size and score, and keeps the encoded bytes only for members
    of positive groups (the only ones the retest stage needs).
    """

    def __init__(self, model_path: str, group_size: int, threshold: float, seed: int, device: str = "auto",
                 threads: int = 1) -> None:
        super().__init__(model_path, device, threads)
        self.group_size = group_size
        self.threshold = threshold
        self.seed = seed

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(batch["uri"])
        ok = np.flatnonzero(np.array([not e for e in batch["error"]], dtype=bool))
        gid = np.full(n, -1, dtype=np.int64)
        gsize = np.zeros(n, dtype=np.int16)
        gscore = np.full(n, np.nan, dtype=np.float32)
        if ok.size:
            groups = [ok[g] for g in form_groups(ok.size, self.group_size, batch_rng(self.seed, batch["uri"][ok[0]]))]
            order = np.concatenate(groups)
            with inference_context(self.device):
                logits = self.model.forward_groups(self._to_device(batch["pixels"][order]), [len(g) for g in groups])
            scores = torch.sigmoid(logits.float()).cpu().numpy()
            for members, score in zip(groups, scores):
                gid[members] = group_id([batch["uri"][i] for i in members])
                gsize[members] = len(members)
                gscore[members] = score
        positive = gscore >= self.threshold
        keep = np.array([b if p else b"" for b, p in zip(batch["bytes"], positive)], dtype=object)
        return {
            "uri": batch["uri"],
            "bytes": keep,
            "error": batch["error"],
            "group_id": gid,
            "group_size": gsize,
            "group_score": gscore,
        }


class Retest(_ModelActor):
    """Round two (Dorfman): members of positive groups are scored one by one by the individual
    model; everything else passes through. Emits the final flags rows."""

    def __init__(self, model_path: str, group_threshold: float, threshold: float, device: str = "auto",
                 threads: int = 1) -> None:
        super().__init__(model_path, device, threads)
        self.group_threshold = group_threshold
        self.threshold = threshold
        self.size = self.card.input_size

    def __call__(self, batch: dict[str, np.ndarray]) -> pa.Table:
        n = len(batch["uri"])
        errors = [e or None for e in batch["error"]]
        gscore = batch["group_score"].astype(np.float32)
        individual = np.full(n, np.nan, dtype=np.float32)
        todo = [i for i in np.flatnonzero(gscore >= self.group_threshold) if errors[i] is None]
        if todo:
            pixels, decode_errors = decode_many([batch["bytes"][i] for i in todo], self.size)
            with inference_context(self.device):
                logits = self.model(self._to_device(pixels))
            individual[todo] = torch.sigmoid(logits.float()).cpu().numpy()
            for i, err in zip(todo, decode_errors):
                if err is not None:  # decoded in round one, so this is a changed or vanished object
                    errors[i] = f"retest {err}"
                    individual[i] = np.nan
        flagged, retested, score = dorfman_decide(gscore, self.group_threshold, individual, self.threshold)
        is_error = np.array([e is not None for e in errors], dtype=bool)
        decided_by = np.where(is_error, "error", np.where(retested, "retest", "group"))
        return pa.table(
            {
                "uri": pa.array(batch["uri"], pa.string()),
                "flagged": pa.array(flagged & ~is_error),
                "score": pa.array(score, pa.float32(), mask=is_error | np.isnan(score)),
                "group_id": pa.array(batch["group_id"], pa.int64(), mask=batch["group_id"] < 0),
                "group_size": pa.array(batch["group_size"], pa.int16(), mask=batch["group_id"] < 0),
                "group_score": pa.array(gscore, pa.float32(), mask=np.isnan(gscore)),
                "decided_by": pa.array(decided_by, pa.string()),
                "error": pa.array(errors, pa.string()),
            },
            schema=FLAGS_SCHEMA,
        )
