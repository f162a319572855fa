"""Fine-tuning a screen model's shared stages on merged groups of cached embeddings.

Training a group model and repairing one after a compression step are the same loop: sample
groups of k from cached per-image embeddings (label = any positive in the group), merge them the
way the model's design does, and train the stages after the first merge. Compression adds a
teacher: the uncompressed model's logits on the same groups are a second, soft target
(distillation), which recovers a pruned network in far fewer steps than labels alone.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from ngt_ray.nets.model import GroupTestingModel, gather
from ngt_ray.training.embeddings import sample_groups

log = logging.getLogger(__name__)

__all__ = ["FinetuneConfig", "finetune_groups", "group_loss"]


@dataclass(frozen=True)
class FinetuneConfig:
    group_size: int
    steps: int
    first_trained: int  # stages from this index on, and the head, are trained
    groups_per_step: int = 16
    lr: float = 1e-3  # stages; the head takes ten times this
    pos_weight: float = 1.0  # weight of positive groups in the label loss
    distill_weight: float = 1.0  # weight of the teacher's soft targets (when a teacher is given)
    # the individual model's decision logit: its members' largest logit is centred there, so an
    # all-negative group's soft target is low (uncentred, a group of 8 got one above a half)
    distill_centre: float = 0.0
    # group sizes drawn in every step (default: group_size alone); halving scores every size down
    # to 1, so a screen trained on one size alone loses the others
    sizes: tuple[int, ...] | None = None
    # batch-norm statistics of the trained stages stay the ImageNet ones (affine still trained);
    # fitted to k = 8 maxima they misnormalise every other size
    freeze_batch_norm: bool = False


def group_loss(logits: torch.Tensor, labels: torch.Tensor, pos_weight: float = 1.0,
               teacher_logits: torch.Tensor | None = None, distill_weight: float = 1.0) -> torch.Tensor:
    """Binary cross-entropy with positive groups up-weighted, plus cross-entropy against the
    teacher's probabilities when a teacher is given."""
    loss = F.binary_cross_entropy_with_logits(logits, labels, pos_weight=logits.new_tensor(pos_weight))
    if teacher_logits is not None:
        loss = loss + distill_weight * F.binary_cross_entropy_with_logits(logits, torch.sigmoid(teacher_logits))
    return loss


def finetune_groups(model: GroupTestingModel, embedded: torch.Tensor, labels: np.ndarray, weights: np.ndarray,
                    cfg: FinetuneConfig, rng: np.random.Generator, device: torch.device,
                    teacher: GroupTestingModel | None = None, member_logits: np.ndarray | None = None) -> list[float]:
    """Train ``model``'s stages from ``cfg.first_trained`` and its head on groups of
    ``cfg.group_size`` (half of them positive; negatives drawn by ``weights``). Returns the losses.

    The soft target is either a ``teacher`` group model's logit on the same merged group
    (compression), or, with ``member_logits`` (the individual model's logit per embedded image),
    the largest of the members' logits: "would the confirmation flag any of them". That target
    also grades negatives (a gun-like negative group is nearer the boundary than a kitchen), a
    denser signal than the labels for a screen learning from few positives.

    Batch norm runs in training mode (its statistics adapt to merged maps, maxima over several
    images) unless ``cfg.freeze_batch_norm``; groups are of ``cfg.sizes`` when given.
    """
    late = model.backbone.stages[cfg.first_trained :]
    for p in model.backbone.stages[: cfg.first_trained].parameters():
        p.requires_grad_(False)
    opt = torch.optim.AdamW(
        [{"params": late.parameters(), "lr": cfg.lr}, {"params": model.head.parameters(), "lr": 10 * cfg.lr}],
        weight_decay=1e-4,
    )
    if cfg.steps >= 20:
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=[cfg.lr, 10 * cfg.lr], total_steps=cfg.steps,
                                                    pct_start=0.1)
    else:  # too few steps for a warm-up and a decay: a constant rate
        sched = torch.optim.lr_scheduler.ConstantLR(opt, factor=1.0)
    late.train()
    if cfg.freeze_batch_norm:
        for module in late.modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                module.eval()
    drawn = cfg.sizes or (cfg.group_size,)
    per_size = max(1, cfg.groups_per_step // len(drawn))
    losses: list[float] = []
    for step in range(cfg.steps):
        groups = [g for k in drawn for g in sample_groups(labels, k, per_size, rng, negative_weights=weights)]
        y = torch.tensor([float(labels[g].any()) for g in groups], device=device)
        h, sizes = gather(embedded, groups, device), [len(g) for g in groups]
        teacher_logits = None
        if teacher is not None:
            with torch.no_grad():
                teacher_logits = teacher.score_groups(h, sizes)
        elif member_logits is not None:
            teacher_logits = torch.tensor([float(member_logits[g].max()) - cfg.distill_centre for g in groups],
                                          device=device)
        loss = group_loss(model.score_groups(h, sizes), y, cfg.pos_weight, teacher_logits, cfg.distill_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
        if step % 100 == 0 or step == cfg.steps - 1:
            log.info("fine-tune step %d/%d: loss %.3f", step, cfg.steps, float(np.mean(losses[-100:])))
    late.eval()
    return losses
