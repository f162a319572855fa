"""Train the individual and the group (screen) model for the rare class, then calibrate them.

Individual model: the ImageNet backbone stays frozen at its native resolution and a head is fitted
on its pooled features (``ngt_ray.training.heads``): a penalised logistic regression whose penalty
is chosen on val, optionally beside ImageNet's own log-probability of related classes as a prior
(``--imagenet-classes``; ``ngt_ray.nets.heads``), and optionally with degraded copies of the
training photos (``--degrade``) and copy-paste composites (``--paste``). On the firearm manifest,
what generalised to in-scene photos of unseen families was the prior, a strong penalty and a third
of the photos degraded; composites made the model flag the everyday scenes they were pasted into
(docs/firearm/README.md), so the firearm command turns them off.
Group model, any design (pixel, feature, tree merge): the stages before ``train_from`` stay frozen
and the per-image embeddings are cached once; the stages after and the head are fine-tuned on
merged groups of k (label = any positive, optionally the individual model's verdict as a soft
target; half the groups positive, positives also mirrored; a quarter of the negative slots drawn
from the individual model's hardest negatives), at a reduced screening resolution. Thresholds are
calibrated on the held-out ``val`` split: the individual model's for a recall of its positive
images, the group model's per size for a recall of the positive groups among what the individual
model flags. CPU-sized by default; on a GPU raise ``--steps`` and ``--max-negatives``.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ngt_ray.grouptesting.calibration import auc_of, binary_metrics, threshold_for_recall
from ngt_ray.nets.backbone import BACKBONES, build_backbone
from ngt_ray.nets.checkpoint import ModelCard, model_stem, save_checkpoint
from ngt_ray.nets.heads import build_head
from ngt_ray.nets.model import DESIGNS, GroupTestingModel
from ngt_ray.nets.runtime import pick_device
from ngt_ray.options import option
from ngt_ray.tools.calibrate import FittingOptions, calibrate_sizes, composite_rows
from ngt_ray.training.copypaste import pasted_positives
from ngt_ray.training.degrade import degraded_copies
from ngt_ray.training.embeddings import (
    embed_images,
    hard_negative_weights,
    score_cached_groups,
    subsample_negatives,
    training_embeddings,
)
from ngt_ray.training.finetune import FinetuneConfig, finetune_groups
from ngt_ray.training.heads import fit_head
from ngt_ray.training.labelled import LabelledImage, labelled_photos

log = logging.getLogger(__name__)

__all__ = ["TrainConfig", "train"]

@dataclass(frozen=True, kw_only=True)
class TrainConfig(FittingOptions):
    """One training run of the individual and group models."""

    output: Path = option(Path("ngt_ray/checkpoints"), "folder for the checkpoints")
    positive_class: str = option("revolver", "name of the class: on the model card and in the checkpoint names")
    backbone: str = option("efficientnet-lite0", "staged backbone (ngt_ray.nets.backbone)",
                           choices=lambda: list(BACKBONES))
    design: str = option("feature", "merge design of the group model", choices=lambda: list(DESIGNS))
    group_size: int = option(8, "k of the training groups")
    merge_depths: tuple[int, ...] | None = option(None, "stage indices where groups merge (default: the "
                                                        "backbone's for the design)")
    train_from: int | None = option(None, "first fine-tuned stage (default: the first merge depth; pixel: 4)")
    screen_size: int = option(160, "input size of the group (screen) model; retests run at the native size")
    steps: int = option(900, "fine-tuning steps of the group model's late stages")
    groups_per_step: int = option(16, "groups per fine-tuning step")
    epochs: int = option(400, "epochs of the individual model's head")
    individual: bool = option(True, "also write the individual model (its scores mine hard negatives either way)")
    paste: int = option(600, "copy-paste positives added to train: cut-outs of its product-shot positives pasted "
                             "into its scenes (ngt_ray.training.copypaste); a third as many on val, reported only")
    paste_screen: bool = option(False, "also train the group model on the composites (the individual always is)")
    individual_recall: float | None = option(None, "recall of val positives the individual model's threshold is "
                                                   "set for (default: --target-recall); with a few dozen varied "
                                                   "positives, 0.99 means every one, however odd, sets it")
    distill: float = option(0.0, "weight of the individual model's verdict on a group (its members' largest "
                                 "logit) as a soft target of the group model, beside the labels")
    imagenet_classes: tuple[int, ...] = option((), "ImageNet-1k class indices whose log-probability the individual "
                                                   "model's head keeps as a prior (ngt_ray.nets.heads; firearms: "
                                                   "413,763,764); default: a plain linear head")
    screen: bool = option(True, "also train and calibrate the group (screen) model")
    # Off by default: with both on, the firearm tree screen's CPU-sized fine-tuning collapsed to a
    # constant output (docs/firearm/README.md).
    mixed_sizes: tuple[int, ...] = option((), "group sizes drawn in every fine-tuning step, e.g. 1,2,4,8,16 "
                                              "(default: --group-size alone)")
    freeze_batch_norm: bool = option(False, "keep the ImageNet batch-norm statistics of the fine-tuned stages")
    degrade: float = option(0.0, "fraction of train photos the individual model also sees as degraded copies: "
                                 "dark, blurred, grey, compressed (ngt_ray.training.degrade)")

    @property
    def depths(self) -> tuple[int, ...]:
        return tuple(self.merge_depths or BACKBONES[self.backbone].merge_depths[self.design])

    @property
    def first_trained(self) -> int:
        return self.train_from if self.train_from is not None else (self.depths[0] or 4)


def _logits(head: nn.Module, features: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return head(features.to(next(head.parameters()).device)).squeeze(1).float().cpu().numpy()


def _scores(head: nn.Module, features: torch.Tensor) -> np.ndarray:
    return torch.sigmoid(torch.from_numpy(_logits(head, features))).numpy()


def _head_spec(cfg: TrainConfig) -> dict[str, Any]:
    return {"kind": "imagenet-prior", "classes": list(cfg.imagenet_classes)} if cfg.imagenet_classes else {}


def _individual_card(cfg: TrainConfig, size: int, scores: np.ndarray, labels: np.ndarray,
                     source: dict[str, Any]) -> ModelCard:
    target = cfg.individual_recall or cfg.target_recall
    threshold = threshold_for_recall(scores[labels == 1], target)
    return ModelCard(
        backbone=cfg.backbone, design="individual", merge_at=4, group_size=1, input_size=size,
        threshold=threshold, trained_modules=["head"],
        positive_class=cfg.positive_class, head=_head_spec(cfg),
        validation={"split": "val", "target_recall": target, "unit": "image",
                    **binary_metrics(labels, scores, threshold)},
        training={"split": "train", "data": source, "max_negatives": cfg.max_negatives, "seed": cfg.seed,
                  "examples": len(labels), "epochs": cfg.epochs, "frozen": "backbone weights"},
    )


def _composite_metrics(composite: np.ndarray, negatives: np.ndarray, threshold: float) -> dict[str, float]:
    """How pasted positives fare against the real negatives: AUROC, and recall at the threshold."""
    return {"composites": len(composite), "auroc": auc_of(composite, negatives),
            "recall": float((composite >= threshold).mean())}


@dataclass
class _TrainingSet:
    """The photos one run fits on: real train and val photos (negatives subsampled), copy-paste
    composites, degraded copies of train photos, the labels of what the individual model embeds
    per split (train: real photos, composites, degraded copies), and their description for the cards."""

    splits: dict[str, list[LabelledImage]]
    pasted: dict[str, list[LabelledImage]]
    degraded: list[LabelledImage]
    labels: dict[str, np.ndarray]
    source: dict[str, Any]


@dataclass
class _Individual:
    """The trained individual model, its card, its pooled features per split and the val composites
    it flags (the screen must pass them too)."""

    model: GroupTestingModel
    card: ModelCard
    features: dict[str, torch.Tensor]
    caught: list[LabelledImage]

    def scores(self, split: str) -> np.ndarray:
        return _scores(self.model.head, self.features[split])

    def logits(self, split: str) -> np.ndarray:
        return _logits(self.model.head, self.features[split])


def train(cfg: TrainConfig) -> dict[str, ModelCard]:
    """Train both models, calibrate them on ``val``, and write checkpoints under ``cfg.output``."""
    start = time.perf_counter()
    rng = np.random.default_rng(cfg.seed)
    torch.manual_seed(cfg.seed)
    device = pick_device(cfg.device)
    screen = _screen_model(cfg, device)  # first: its head is initialised first from the seeded generator
    native = screen.backbone.spec.input_size
    data = _training_set(cfg, native, rng)
    individual = _train_individual(cfg, data, native, device)
    if cfg.individual:
        save_checkpoint(individual.model, individual.card, cfg.output / model_stem(individual.card),
                        [k for k in individual.model.state_dict() if k.startswith("head.")])
    log.info("individual: %s", individual.card.validation)
    cards = {"individual": individual.card}
    if cfg.screen:
        cards["group"] = _train_screen(cfg, screen, data, individual, rng, device)
    log.info("trained in %.0f s", time.perf_counter() - start)
    return cards


def _screen_model(cfg: TrainConfig, device: torch.device) -> GroupTestingModel:
    """The group model to train: merges at ``cfg.depths``, or the cascade (no merge: every stage
    per image, a head like the individual's)."""
    backbone = build_backbone(cfg.backbone)
    if cfg.design == "cascade":
        return GroupTestingModel(backbone, (len(backbone),), cfg.design,
                                 head=build_head(cfg.backbone, _head_spec(cfg))).to(device).eval()
    return GroupTestingModel(backbone, cfg.depths, cfg.design).to(device).eval()


def _training_set(cfg: TrainConfig, native: int, rng: np.random.Generator) -> _TrainingSet:
    """The labelled train and val photos, with the composites and degraded copies made from them."""
    photos = labelled_photos(cfg)
    source: dict[str, Any] = {**photos.origin, "splits": photos.report()}
    splits = {s: subsample_negatives(photos.split(s), cfg.max_negatives, rng) for s in ("train", "val")}
    # Composites: train learns from them; val's only say how small guns in scenes fare, since
    # thresholds are set on real photos.
    pasted, source["composites"] = {}, {}
    for split, n in (("train", cfg.paste), ("val", cfg.paste // 3)):
        pasted[split], source["composites"][split] = pasted_positives(splits[split], n, rng) if n else ([], {})
    labels = {s: np.array([lab for _, lab in items]) for s, items in splits.items()}
    # Degraded copies (dark, blurred, compressed) teach the individual model that such a look is no gun.
    degraded = degraded_copies(splits["train"], cfg.degrade, native, rng) if cfg.degrade else []
    labels["train"] = np.concatenate([labels["train"], np.ones(len(pasted["train"]), dtype=int),
                                      np.array([y for _, y in degraded], dtype=int)])
    source["degraded_copies"] = {"fraction": cfg.degrade, "train": len(degraded)}
    return _TrainingSet(splits, pasted, degraded, labels, source)


def _train_individual(cfg: TrainConfig, data: _TrainingSet, native: int, device: torch.device) -> _Individual:
    """The individual model: frozen backbone at native resolution, a logistic-regression head,
    its threshold set on val. Its training-set scores also say which negatives are hard for the
    group model."""
    individual = GroupTestingModel(build_backbone(cfg.backbone), 4,
                                   head=build_head(cfg.backbone, _head_spec(cfg))).to(device).eval()
    features = {}
    for split, items in data.splits.items():
        items = items + data.pasted["train"] + data.degraded if split == "train" else items
        log.info("individual, %s: %d images (%d positive)", split, len(items), data.labels[split].sum())
        features[split] = _pooled(individual, items, native, cfg.batch_size, device)
    fitted = fit_head(individual.head, (features["train"], data.labels["train"]),
                      (features["val"], data.labels["val"]), epochs=cfg.epochs, seed=cfg.seed)
    trained = _Individual(individual, _individual_card(cfg, native, _scores(individual.head, features["val"]),
                                                       data.labels["val"], data.source), features, [])
    trained.card.training["head_fit"] = fitted
    if data.pasted["val"]:
        composite = _scores(individual.head, _pooled(individual, data.pasted["val"], native, cfg.batch_size, device))
        trained.card.validation["composites"] = _composite_metrics(
            composite, trained.scores("val")[data.labels["val"] == 0], trained.card.threshold)
        trained.caught = [item for item, score in zip(data.pasted["val"], composite)
                          if score >= trained.card.threshold]
    return trained


def _pooled(model: GroupTestingModel, items: list[LabelledImage], size: int, batch: int,
            device: torch.device) -> torch.Tensor:
    """The pooled features of each photo alone."""
    embedded = embed_images(model, items, size, batch, device)
    return score_cached_groups(model, embedded, [[i] for i in range(len(embedded))], device, features=True)


def _train_screen(cfg: TrainConfig, model: GroupTestingModel, data: _TrainingSet, individual: _Individual,
                  rng: np.random.Generator, device: torch.device) -> ModelCard:
    """Fit the group model, calibrate it per size on val and write it.

    Screens are calibrated on the real val positives the individual model flags: held to losing
    none of what the confirmation would find, not what it would miss anyway. Composites are
    reported beside them (``validation["composites"]``), never set a threshold."""
    flagged = individual.scores("val") >= individual.card.threshold
    kept = np.flatnonzero((data.labels["val"] == 0) | flagged)
    if cfg.design == "cascade":  # its val features are its embeddings: the calibration reuses them
        card, val_features = _cascade(cfg, model, data.splits["train"] + data.degraded, data.splits["val"],
                                      data.source, device)
        first, embedded_val = len(model.backbone), val_features[kept]
    else:
        card = _fine_tuned_screen(cfg, model, data, individual, rng, device)
        first = cfg.first_trained
        embedded_val = embed_images(model, [data.splits["val"][i] for i in kept], cfg.screen_size, cfg.batch_size,
                                    device)
    card = _calibrated_screen(cfg, model, card, embedded_val, data.labels["val"][kept], individual.caught, device)
    save_checkpoint(model, card, cfg.output / model_stem(card), model.shared_state_keys(first))
    log.info("group model: %s", card.validation)
    return card


def _calibrated_screen(cfg: TrainConfig, model: GroupTestingModel, card: ModelCard, embedded_val: torch.Tensor,
                       val_labels: np.ndarray, caught: list[LabelledImage], device: torch.device) -> ModelCard:
    """``card`` with a threshold per calibrated size, and how the val composites the individual
    model flags fare at them."""
    card.training["calibration_positives"] = {"real": int(val_labels.sum()), "composites": len(caught)}
    card = calibrate_sizes(model, card, embedded_val, val_labels, cfg.calibration_sizes, cfg.target_recall,
                           cfg.val_groups, cfg.seed, device, split="val")
    if caught:
        embedded_caught = embed_images(model, caught, cfg.screen_size, cfg.batch_size, device)
        card.validation["composites"] = composite_rows(
            model, torch.cat([embedded_val, embedded_caught]),
            np.concatenate([np.where(val_labels == 1, -1, 0), np.ones(len(caught), dtype=int)]), card, cfg.seed,
            device)
    return card


def _fine_tuned_screen(cfg: TrainConfig, model: GroupTestingModel, data: _TrainingSet, individual: _Individual,
                       rng: np.random.Generator, device: torch.device) -> ModelCard:
    """A merge-design screen: stages from ``first_trained`` fine-tuned on merged groups at the screening size."""
    size = cfg.screen_size
    log.info("group model (%s merge at %s): embeddings of train and val at %d px", cfg.design, cfg.depths, size)
    # Composites train the screen only when asked: at the screening size and an early merge a small
    # pasted gun is a weak signal, and on the firearm set they kept the CPU-sized fine-tuning from
    # learning anything.
    screen_train = data.splits["train"] + (data.pasted["train"] if cfg.paste_screen else [])
    embedded, train_labels, mirrored = training_embeddings(model, screen_train, size, cfg.batch_size, device)
    weights = hard_negative_weights(
        np.concatenate([individual.scores("train")[: len(screen_train)], np.ones(mirrored)]), train_labels,
        cfg.hard_negative_fraction)
    # Frozen ImageNet features do not survive a max over eight images: the late stages must adapt
    # to merged inputs.
    member_logits = None
    if cfg.distill:  # the individual model's logit per embedded image (a mirrored copy takes its original's)
        logits = individual.logits("train")[: len(screen_train)]
        member_logits = np.concatenate([logits, logits[data.labels["train"][: len(screen_train)] == 1]])
    threshold = individual.card.threshold
    centre = float(np.log(threshold / (1 - threshold)))  # the individual's decision logit
    losses = finetune_groups(model, embedded, train_labels, weights,
                             FinetuneConfig(cfg.group_size, cfg.steps, cfg.first_trained, cfg.groups_per_step,
                                            distill_weight=cfg.distill, distill_centre=centre,
                                            sizes=cfg.mixed_sizes or None, freeze_batch_norm=cfg.freeze_batch_norm),
                             rng, device, member_logits=member_logits)
    first = cfg.first_trained
    return ModelCard(
        backbone=cfg.backbone, design=cfg.design, merge_at=cfg.depths[0], group_size=cfg.group_size,
        input_size=size, threshold=0.5, merge_depths=list(cfg.depths),
        trained_modules=["head", f"backbone.stages[{first}:]"],
        validation={"unit": f"group of {cfg.group_size}"},
        positive_class=cfg.positive_class,
        training={"split": "train", "data": data.source, "max_negatives": cfg.max_negatives, "seed": cfg.seed,
                  "steps": cfg.steps, "groups_per_step": cfg.groups_per_step, "positive_group_fraction": 0.5,
                  "hard_negative_fraction": cfg.hard_negative_fraction, "mirrored_positives": mirrored,
                  "final_loss": float(np.mean(losses[-100:])), "frozen": f"backbone.stages[:{first}]",
                  "distill": cfg.distill, "distill_centre": centre, "mixed_sizes": list(cfg.mixed_sizes),
                  "freeze_batch_norm": cfg.freeze_batch_norm},
    )


def _cascade(cfg: TrainConfig, model: GroupTestingModel, train_items: list[LabelledImage],
             val_items: list[LabelledImage], source: dict[str, Any],
             device: torch.device) -> tuple[ModelCard, torch.Tensor]:
    """The no-grouping screen: the frozen backbone at ``screen_size`` and a head fitted as the
    individual's is (same prior, penalty chosen on val): nothing to fine-tune, so seconds of fitting
    after one low-resolution forward per photo. Returns its card and the val photos' embeddings."""
    size = cfg.screen_size
    log.info("cascade screen: pooled features of train and val at %d px", size)
    features = {}
    for split, items in (("train", train_items), ("val", val_items)):
        embedded = embed_images(model, items, size, cfg.batch_size, device)
        features[split] = (embedded.float(), np.array([y for _, y in items]))
    fitted = fit_head(model.head, features["train"], features["val"], epochs=cfg.epochs, seed=cfg.seed)
    card = ModelCard(
        backbone=cfg.backbone, design="cascade", merge_at=len(model.backbone), group_size=1, input_size=size,
        threshold=0.5, merge_depths=[len(model.backbone)], trained_modules=["head"],
        validation={"unit": "image"}, positive_class=cfg.positive_class, head=_head_spec(cfg),
        training={"split": "train", "data": source, "max_negatives": cfg.max_negatives, "seed": cfg.seed,
                  "examples": len(train_items), "head_fit": fitted, "frozen": "backbone weights"},
    )
    return card, features["val"][0]
