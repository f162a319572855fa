"""Per-size calibration of a screen model on validation groups.

A group threshold does not carry over between group sizes (a max over 16 images looks more
"positive" than a max over 4), nor between designs. For every size the screen will test, groups of
held-out photos are scored and the highest threshold meeting the target recall of positive groups
is kept, with the recall and the pass rate of negative groups measured there: the numbers the
``--group-size auto`` cost model and the halving retests read from the model card.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from ngt_ray.grouptesting.calibration import binary_metrics, calibrate_scores, roc_auc, threshold_for_recall
from ngt_ray.nets.checkpoint import ModelCard, load_checkpoint, write_card
from ngt_ray.nets.model import GroupTestingModel
from ngt_ray.nets.runtime import pick_device
from ngt_ray.options import Common, Photos, option
from ngt_ray.training.embeddings import embed_images, sample_groups, score_cached_groups
from ngt_ray.training.labelled import labelled_photos

log = logging.getLogger(__name__)

__all__ = ["DEFAULT_SIZES", "calibrate_sizes", "composite_rows", "pass_rates"]

RECALLS = (0.9, 0.95, 0.99)  # the recall targets pass rates are reported at

DEFAULT_SIZES = (1, 2, 4, 8, 16, 32)


@dataclass(frozen=True, kw_only=True)
class FittingOptions(Common, Photos):
    """What training and compression share: the splits they fit and calibrate on, and the target."""

    max_negatives: int = option(1500, "negatives per split (a CPU-sized default)")
    hard_negative_fraction: float = option(0.25, "share of negatives drawn from the individual model's hardest")
    val_groups: int = option(600, "validation groups per calibrated size")
    calibration_sizes: tuple[int, ...] = option(DEFAULT_SIZES, "group sizes to calibrate")
    target_recall: float = option(0.99, "of positive groups (and positive images)")
    batch_size: int = option(32, "images per embedding batch")


@dataclass(frozen=True, kw_only=True)
class CalibrateConfig(Common, Photos):
    """Re-calibration of a saved screen model's per-size thresholds on the validation photos."""

    model: str = option(help="screen checkpoint stem; its card is rewritten")
    sizes: tuple[int, ...] = option(DEFAULT_SIZES, "group sizes to calibrate")
    target_recall: float = option(0.99, "of positive groups")
    groups: int = option(600, "validation groups per size")


def calibrate_sizes(model: GroupTestingModel, card: ModelCard, embedded: torch.Tensor, labels: np.ndarray,
                    sizes: Sequence[int] = DEFAULT_SIZES, target_recall: float = 0.99, groups_per_size: int = 600,
                    seed: int = 0, device: torch.device | str = "cpu", split: str = "val") -> ModelCard:
    """A copy of ``card`` with a threshold per size in ``sizes`` (size 1: every image once)."""
    device = torch.device(device)
    rng = np.random.default_rng(seed)
    table, metrics, rates = {}, {}, {}
    for k in sizes:
        if k > int((labels == 0).sum()) + 1:
            log.warning("skipping size %d: too few validation negatives", k)
            continue
        groups = ([[i] for i in range(len(labels))] if k == 1
                  else sample_groups(labels, k, groups_per_size, rng))
        scores = torch.sigmoid(score_cached_groups(model, embedded, groups, device)).numpy()
        truth = np.array([labels[g].any() for g in groups])
        row = table[k] = calibrate_scores(truth, scores, target_recall)
        metrics[k] = binary_metrics(truth, scores, row.threshold)
        rates[k] = pass_rates(truth, scores, seed=seed)
        log.info("size %d: threshold %.4f, recall %.3f, negative pass rate %.3f, AUC %.3f", k, row.threshold,
                 row.recall, row.negative_pass_rate, row.auc)
    validation = dict(card.validation)
    validation["calibration"] = {"split": split, "target_recall": target_recall, "groups_per_size": groups_per_size,
                                 "positive_group_fraction": 0.5,
                                 "pass_rates": {str(k): r for k, r in rates.items()}}
    if card.group_size in metrics:  # the headline numbers follow the new threshold at the trained size
        validation.update(metrics[card.group_size], target_recall=target_recall, split=split,
                          unit="image" if card.group_size == 1 else f"group of {card.group_size}")
    return replace(card, calibration=table, validation=validation,
                   threshold=table[card.group_size].threshold if card.group_size in table else card.threshold)


def pass_rates(truth: np.ndarray, scores: np.ndarray, recalls: Sequence[float] = RECALLS, n: int = 300,
               seed: int = 0) -> dict[str, list[float]]:
    """The negative-group pass rate at a threshold for each recall target, with a 95 % bootstrap
    interval (positive and negative groups resampled separately): ``{"0.9": [rate, low, high]}``.

    At recall 0.99 a hundred positives make the worst one the threshold, so the lower targets say
    what the screen is like, and the interval how far to trust it."""
    truth = np.asarray(truth).astype(bool)
    pos, neg = np.asarray(scores)[truth], np.asarray(scores)[~truth]
    rng = np.random.default_rng(seed)

    def rate(p: np.ndarray, q: np.ndarray, r: float) -> float:
        return float((q >= threshold_for_recall(p, r)).mean())

    out = {}
    for r in recalls:
        boot = [rate(rng.choice(pos, len(pos)), rng.choice(neg, len(neg)), r) for _ in range(n)]
        out[f"{r:g}"] = [rate(pos, neg, r), float(np.quantile(boot, 0.025)), float(np.quantile(boot, 0.975))]
    return out


def composite_rows(model: GroupTestingModel, embedded: torch.Tensor, labels: np.ndarray, card: ModelCard,
                   seed: int = 0, device: torch.device | str = "cpu", groups_per_size: int = 200) -> dict[str, dict]:
    """How copy-paste composites fare at each calibrated threshold, reported beside the real photos'
    rows and never mixed into them. ``labels``: 1 composites, 0 negatives, -1 rows to leave out
    (the real positives)."""
    rng = np.random.default_rng(seed)
    keep = np.flatnonzero(labels >= 0)
    sub = labels[keep]
    out = {}
    for k in card.calibrated_sizes:
        if k > int((sub == 0).sum()) + 1:
            continue
        groups = [[i] for i in range(len(sub))] if k == 1 else sample_groups(sub, k, groups_per_size, rng)
        scores = torch.sigmoid(score_cached_groups(model, embedded[keep], groups, torch.device(device))).numpy()
        truth = np.array([sub[g].any() for g in groups])
        out[str(k)] = {"recall": float((scores[truth] >= card.threshold_for(k)).mean()), "auc": roc_auc(truth, scores),
                       "positive_groups": int(truth.sum())}
    return out


def recalibrate(stem: str | Path, photos: Photos, sizes: Sequence[int] = DEFAULT_SIZES, target_recall: float = 0.99,
                groups_per_size: int = 600, seed: int = 0, device: str = "auto", batch: int = 32) -> ModelCard:
    """Re-calibrate a saved screen checkpoint on the whole ``val`` split of ``photos`` and rewrite its card."""
    model, card = load_checkpoint(stem)
    if card.design == "individual":
        raise ValueError(f"{stem} is an individual model; calibrate a screen (group) model")
    dev = pick_device(device)
    model = model.to(dev)
    labelled = labelled_photos(photos)
    items = labelled.split("val")
    labels = np.array([label for _, label in items])
    embedded = embed_images(model, items, card.input_size, batch, dev)
    card = calibrate_sizes(model, card, embedded, labels, sizes, target_recall, groups_per_size, seed, dev,
                           split=f"{labelled.name} val")
    write_card(card, stem)
    return card
