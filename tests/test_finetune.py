"""Fine-tuning draws the same groups every step, whatever the mix of sizes."""

from __future__ import annotations

import numpy as np
import torch

from ngt_ray.nets.backbone import build_backbone
from ngt_ray.nets.model import GroupTestingModel
from ngt_ray.training import finetune
from ngt_ray.training.finetune import FinetuneConfig, finetune_groups


def test_every_step_draws_groups_of_every_mixed_size_and_no_more(monkeypatch):
    drawn: list[int] = []  # the size of every group drawn
    real = finetune.sample_groups

    def recording(labels, k, n, rng, **kw):
        groups = real(labels, k, n, rng, **kw)
        drawn.extend(len(g) for g in groups)
        return groups

    monkeypatch.setattr(finetune, "sample_groups", recording)
    model = GroupTestingModel(build_backbone(), (4, 6, 8), "tree")
    with torch.no_grad():
        embedded = model.embed(torch.randint(0, 256, (40, 3, 32, 32), dtype=torch.uint8)).half()
    labels = np.array([1] * 5 + [0] * 35)
    cfg = FinetuneConfig(8, 4, 12, groups_per_step=16, sizes=(1, 2, 4, 8, 16), freeze_batch_norm=True)
    losses = finetune_groups(model, embedded, labels, np.ones(40), cfg, np.random.default_rng(0), torch.device("cpu"))
    # 4 steps of 3 groups of each size: a step's draw never grows with the steps before it
    assert len(losses) == 4 and sorted(drawn) == sorted([1, 2, 4, 8, 16] * 3 * 4)
    # frozen batch norm: the running statistics of the trained stages are still ImageNet's
    base = build_backbone()
    torch.testing.assert_close(model.backbone.stages[12]._bn1.running_mean, base.stages[12]._bn1.running_mean)
