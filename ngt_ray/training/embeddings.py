"""Per-image embeddings cached once, and groups sampled from them.

Training, calibration and evaluation all score many groups built from the same few thousand
photos. The per-image stages are computed once per image (fp16 on the CPU); each group then costs
only the shared stages, which is what makes thousands of groups affordable on a CPU.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from ngt_ray.nets.decode import decode_image
from ngt_ray.nets.model import GroupTestingModel, gather
from ngt_ray.nets.runtime import inference_context
from ngt_ray.training.labelled import LabelledImage, read_image_bytes

__all__ = [
    "embed_images", "hard_negative_weights", "sample_groups", "score_cached_groups", "subsample_negatives",
    "training_embeddings",
]


def embed_images(model: GroupTestingModel, items: Sequence[LabelledImage], size: int, batch: int,
                 device: torch.device, flip: bool = False) -> torch.Tensor:
    """``model.embed`` of each photo decoded at ``size`` (mirrored if ``flip``), fp16 on the CPU."""
    chunks = []
    for i in range(0, len(items), batch):
        arrays = []
        for path, _ in items[i : i + batch]:
            arr, err = decode_image(read_image_bytes(path), size)
            if arr is None:
                raise ValueError(f"image {path} failed to decode: {err}")
            arrays.append(arr[:, :, ::-1] if flip else arr)
        x = torch.from_numpy(np.ascontiguousarray(np.stack(arrays))).to(device)
        with inference_context(device):
            chunks.append(model.embed(x).half().cpu())
    return torch.cat(chunks)


def training_embeddings(model: GroupTestingModel, items: Sequence[LabelledImage], size: int, batch: int,
                        device: torch.device) -> tuple[torch.Tensor, np.ndarray, int]:
    """Embeddings of ``items`` followed by mirrored copies of the positives (the rare class has a
    few dozen training photos), their labels, and how many mirrored copies were added."""
    positives = [it for it in items if it[1] == 1]
    embedded = torch.cat([embed_images(model, items, size, batch, device),
                          embed_images(model, positives, size, batch, device, flip=True)])
    labels = np.concatenate([np.array([label for _, label in items]), np.ones(len(positives), dtype=int)])
    return embedded, labels, len(positives)


def subsample_negatives(items: list[LabelledImage], max_negatives: int,
                        rng: np.random.Generator) -> list[LabelledImage]:
    """Every positive and at most ``max_negatives`` negatives (in their original order)."""
    pos = [it for it in items if it[1] == 1]
    neg = [it for it in items if it[1] == 0]
    if len(neg) > max_negatives:
        neg = [neg[i] for i in sorted(rng.choice(len(neg), max_negatives, replace=False))]
    return pos + neg


def hard_negative_weights(scores: np.ndarray, labels: np.ndarray, fraction: float) -> np.ndarray:
    """Sampling weights that draw ``fraction`` of negatives from the top decile of a model's scores
    (its nearest misses) and the rest uniformly."""
    weights = np.ones(len(labels))
    neg = np.flatnonzero(labels == 0)
    if fraction <= 0 or len(neg) < 10:
        return weights
    hard = neg[scores[neg] >= np.quantile(scores[neg], 0.9)]
    easy = np.setdiff1d(neg, hard)
    weights[hard] = fraction / len(hard)
    weights[easy] = (1 - fraction) / max(len(easy), 1)
    return weights


def score_cached_groups(model: GroupTestingModel, embedded: torch.Tensor, groups: Sequence[Sequence[int]],
                        device: torch.device, batch_images: int = 256, features: bool = False) -> torch.Tensor:
    """Logits (or pooled features) of ``groups`` of cached embeddings, ``batch_images`` members at a time."""
    out, chunk, members = [], [], 0
    for g in [*groups, None]:
        if g is None or (chunk and members + len(g) > batch_images):
            with inference_context(device):
                h = gather(embedded, chunk, device)
                sizes = [len(c) for c in chunk]
                res = model.group_features(h, sizes) if features else model.score_groups(h, sizes)
            out.append(res.float().cpu())
            chunk, members = [], 0
        if g is not None:
            chunk.append(list(g))
            members += len(g)
    return torch.cat(out) if out else torch.zeros(0)


def sample_groups(labels: np.ndarray, k: int, n: int, rng: np.random.Generator, positive_fraction: float = 0.5,
                  negative_weights: np.ndarray | None = None) -> list[list[int]]:
    """``n`` groups of ``k`` distinct items; ``positive_fraction`` of them hold one positive (a fifth
    of those two, when k allows). ``negative_weights`` biases which negatives are drawn (hard
    negative mining); positives are drawn uniformly."""
    pos, neg = np.flatnonzero(labels == 1), np.flatnonzero(labels == 0)
    if k > len(neg) + 1:
        raise ValueError(f"groups of {k} need at least {k - 1} negatives, have {len(neg)}")
    p = None if negative_weights is None else negative_weights[neg] / negative_weights[neg].sum()
    groups = []
    n_positive = round(n * positive_fraction)
    for g in range(n):
        members = list(rng.choice(neg, min(k, len(neg)), replace=False, p=p))[:k]
        if g < n_positive:
            n_pos = min(len(pos), 1 if rng.random() < 0.8 else min(2, k))
            members[:n_pos] = rng.choice(pos, n_pos, replace=False)
        rng.shuffle(members)
        groups.append([int(m) for m in members])
    return groups
