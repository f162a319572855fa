"""Fit a head on frozen pooled features: penalised logistic regression, its strength chosen on val.

The individual model's backbone stays frozen, so training is a logistic regression on cached
1280-d features: seconds on a CPU. What decides whether it generalises is how far the fitted layer
may stray from "no opinion": with a weak penalty it learns the training photos' look (stock-photo
watermarks, product backdrops, one exporter's squares); with a strong one it keeps to what the
backbone's features say about the object. The penalty is therefore chosen from a grid by the
validation AUROC, and the features are standardised first, so one penalty means the same for every
feature. The standardisation is folded back into the layer, so the model needs no extra step.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from torch import nn

from ngt_ray.grouptesting.calibration import roc_auc
from ngt_ray.nets.heads import ImageNetPriorHead

__all__ = ["PENALTIES", "fit_head"]

log = logging.getLogger(__name__)

PENALTIES = (0.03, 0.1, 0.3, 1.0)  # L2 on the standardised layer's weights, summed (not averaged)


def _linear_part(head: nn.Module) -> nn.Linear:
    return head.linear if isinstance(head, ImageNetPriorHead) else head


def _fit(x: torch.Tensor, y: torch.Tensor, offset: torch.Tensor | None, penalty: float, epochs: int,
         seed: int) -> tuple[nn.Linear, float]:
    """Logistic regression on standardised ``x`` (plus ``alpha * offset``), positives weighted up to
    the negatives' count. Full-batch AdamW: a few thousand rows converge in a few hundred steps."""
    torch.manual_seed(seed)
    linear = nn.Linear(x.shape[1], 1)
    alpha = torch.zeros(1, requires_grad=offset is not None)
    params = [*linear.parameters(), alpha] if offset is not None else list(linear.parameters())
    optimiser = torch.optim.AdamW(params, lr=3e-3, weight_decay=0.0)
    pos_weight = (y.numel() - y.sum()) / y.sum().clamp(min=1)
    for _ in range(epochs):
        optimiser.zero_grad()
        logits = linear(x).squeeze(1) + (alpha * offset if offset is not None else 0)
        loss = nn.functional.binary_cross_entropy_with_logits(logits, y, pos_weight=pos_weight)
        (loss + penalty * linear.weight.pow(2).sum()).backward()
        optimiser.step()
    return linear, float(alpha.detach())


@torch.no_grad()
def _load(head: nn.Module, linear: nn.Linear, alpha: float, mean: torch.Tensor, std: torch.Tensor) -> None:
    """Set ``head`` to the fitted layer with the standardisation folded in: w·(f - m)/s + b."""
    target = _linear_part(head)
    weight = linear.weight / std
    target.weight.copy_(weight)
    target.bias.copy_(linear.bias - (weight * mean).sum(dim=1))
    if isinstance(head, ImageNetPriorHead):
        head.alpha.fill_(alpha)


def fit_head(head: nn.Module, train: tuple[torch.Tensor, np.ndarray], val: tuple[torch.Tensor, np.ndarray],
             penalties: tuple[float, ...] = PENALTIES, epochs: int = 300, seed: int = 0) -> dict[str, float]:
    """Fit ``head`` (a linear layer or an ``ImageNetPriorHead``) in place on pooled features.

    ``train`` and ``val`` are ``(features, labels)``. Each penalty of the grid is fitted on train and
    scored by val AUROC; the best one is kept. Returns the grid's val AUROCs and the choice.
    """
    device = next(head.parameters()).device
    head.cpu()  # a logistic regression on a few thousand rows: the CPU is as quick as anything
    x, y = train[0].float().cpu(), torch.as_tensor(train[1], dtype=torch.float32)
    mean, std = x.mean(0), x.std(0) + 1e-3
    prior = isinstance(head, ImageNetPriorHead)
    with torch.no_grad():
        offset = head.log_prior(x) if prior else None
    scores: dict[str, float] = {}
    best: tuple[float, float, nn.Linear, float] | None = None
    for penalty in penalties:
        linear, alpha = _fit((x - mean) / std, y, offset, penalty, epochs, seed)
        _load(head, linear, alpha, mean, std)
        with torch.no_grad():
            auc = roc_auc(val[1], head(val[0].float().cpu()).squeeze(1).numpy())
        scores[f"val_auroc_at_{penalty:g}"] = auc
        log.info("head penalty %g: val AUROC %.4f (alpha %.2f)", penalty, auc, alpha)
        if best is None or auc > best[0]:
            best = (auc, penalty, linear, alpha)
    assert best is not None, "the penalty grid is empty"
    _load(head, best[2], best[3], mean, std)
    head.to(device)
    return {**scores, "penalty": best[1], "alpha": best[3] if prior else 0.0}
