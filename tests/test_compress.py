"""Compression: pruned models shrink and reload, folds stay exact, acceptance guards the rare class,
and a compressed checkpoint runs in the moderation job."""

from __future__ import annotations

import copy
import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from ngt_ray.nets.backbone import build_backbone
from ngt_ray.nets.checkpoint import (
    ModelCard,
    default_screen_model,
    load_checkpoint,
    save_checkpoint,
)
from ngt_ray.nets.fold import fold_batchnorm
from ngt_ray.nets.model import GroupTestingModel, gather
from ngt_ray.nets.profiling import count_macs
from ngt_ray.nets.surgery import linearise
from ngt_ray.tools.compress import CompressConfig, Holdout, compress
from ngt_ray.training.acceptance import judge
from ngt_ray.training.datasets import caltech_split
from ngt_ray.training.easier import activation_entropy
from ngt_ray.training.embeddings import embed_images, sample_groups
from ngt_ray.training.finetune import group_loss
from ngt_ray.training.pruning import channel_pruner

CPU = torch.device("cpu")
FIRST_SHARED = "backbone.stages.4._expand_conv.weight"
TREE = default_screen_model("tree", compressed=False)


@pytest.fixture(scope="module")
def screen():
    return load_checkpoint(TREE)


@pytest.fixture(scope="module")
def photos(caltech, screen):
    """Embeddings of the validation revolvers and 60 other validation photos, with labels."""
    model, card = screen
    items = caltech_split(caltech, "val")
    chosen = [it for it in items if it[1] == 1] + [it for it in items if it[1] == 0][::20][:60]
    labels = np.array([label for _, label in chosen])
    return embed_images(model, chosen, card.input_size, 32, CPU), labels


def _pruned(model: GroupTestingModel, photos, ratio: float) -> GroupTestingModel:
    """A copy of ``model`` with ``ratio`` of its shared channels removed by Taylor importance."""
    embedded, labels = photos
    model = copy.deepcopy(model)
    pruner = channel_pruner(model, gather(embedded, [[0, 1]], CPU), ratio, 1)
    groups = sample_groups(labels, 4, 8, np.random.default_rng(0))
    y = torch.tensor([float(labels[g].any()) for g in groups])
    group_loss(model.score_groups(gather(embedded, groups, CPU), [4] * 8), y, pos_weight=4.0).backward()
    pruner.step()
    model.zero_grad(set_to_none=True)
    return model.eval()


def test_pruned_model_has_fewer_macs_same_outputs_and_reloads(screen, photos, tmp_path):
    model, card = screen
    embedded, _ = photos
    pruned = _pruned(model, photos, 0.3)
    x = torch.randint(0, 256, (3, 3, card.input_size, card.input_size), dtype=torch.uint8)
    h = gather(embedded, [list(range(8))], CPU)
    assert count_macs(pruned, x) < count_macs(model, x)
    assert count_macs(pruned.score_groups, h, [8]) < 0.8 * count_macs(model.score_groups, h, [8])
    assert pruned.state_dict()[FIRST_SHARED].shape[0] < model.state_dict()[FIRST_SHARED].shape[0]
    with torch.no_grad():
        assert pruned(x).shape == model(x).shape == (3,)
        assert pruned.score_groups(h, [5, 3]).shape == (2,)

    keys = [k for k in pruned.state_dict() if k.startswith(("head.", "backbone.stages."))]
    stem = tmp_path / "pruned"
    save_checkpoint(pruned, ModelCard(**{**card.__dict__, "architecture": {"pruned": True}}), stem, keys)
    reloaded, reloaded_card = load_checkpoint(stem)
    assert reloaded_card.architecture["pruned"]
    expected = copy.deepcopy(pruned)  # what fp16 storage keeps of the weights
    expected.load_state_dict({k: v.half().float() if v.is_floating_point() else v
                              for k, v in pruned.state_dict().items()})
    with torch.no_grad():
        torch.testing.assert_close(reloaded.score_groups(h, [8]), expected.score_groups(h, [8]), rtol=1e-4, atol=1e-5)

    # a card that does not say the weights are pruned gets a clear error, not a silent misload
    (tmp_path / "pruned.json").write_text(json.dumps({**json.loads((tmp_path / "pruned.json").read_text()),
                                                      "architecture": {}}))
    with pytest.raises(ValueError, match="other shapes"):
        load_checkpoint(stem)


def test_folds_of_a_pruned_and_linearised_model_are_exact(screen, photos):
    model, card = screen
    compressed = _pruned(model, photos, 0.3)
    embedded, labels = photos
    groups = sample_groups(labels, 4, 16, np.random.default_rng(1))
    entropy = activation_entropy(compressed, embedded, labels, groups, CPU)
    linearise(compressed, [min(entropy, key=lambda n: entropy[n]["score"])])
    x = torch.randint(0, 256, (4, 3, card.input_size, card.input_size), dtype=torch.uint8)
    folded, count = fold_batchnorm(compressed, x)
    assert count == sum(isinstance(m, torch.nn.BatchNorm2d) for m in compressed.modules())
    h = gather(embedded, groups[:4], CPU)
    with torch.no_grad():
        want, got = compressed.score_groups(h, [4] * 4), folded.score_groups(h, [4] * 4)
    assert ((got - want).abs().max() / want.abs().max()).item() <= 1e-4


def test_entropy_ranks_single_use_activations_and_skips_shared_ones(screen, photos):
    model, _ = screen
    embedded, labels = photos
    groups = sample_groups(labels, 4, 16, np.random.default_rng(2))
    entropy = activation_entropy(model, embedded, labels, groups, CPU)
    # two ReLU6 per MBConv block after the first merge (stages 4-16) and the head's
    assert len(entropy) == 2 * 13 + 1
    for stats in entropy.values():
        assert 0.0 <= stats["positive"] <= np.log2(3) and 0.0 <= stats["negative"] <= np.log2(3)
        assert stats["score"] == max(stats["positive"], stats["negative"])
    # torchvision's BasicBlock applies one ReLU module twice: it cannot be linearised at one site
    resnet = GroupTestingModel(build_backbone("resnet18"), 2, "feature").eval()
    h = torch.randn(8, 64, 8, 8)
    assert activation_entropy(resnet, h, np.array([1, 0] * 4), [[0, 1], [2, 3], [4, 5], [6, 7]], CPU) == {}
    with pytest.raises(TypeError):
        linearise(model, ["backbone.stages.4._expand_conv"])


def test_acceptance_rejects_a_damaged_model_and_keeps_an_intact_one(screen, photos):
    model, _ = screen
    embedded, labels = photos
    holdout = Holdout(embedded, labels, (2, 4), 120, seed=3, target_recall=0.99)
    reference = holdout.run(model, CPU)
    rng = np.random.default_rng(0)
    intact = judge(holdout.labels, *reference, *holdout.run(copy.deepcopy(model), CPU), rng)
    assert intact.accepted and intact.false_negatives == intact.reference_false_negatives
    damaged = _pruned(model, photos, 0.7)  # most channels gone and no fine-tuning
    verdict = judge(holdout.labels, *reference, *holdout.run(damaged, CPU), rng)
    assert not verdict.accepted, verdict


def test_judge_counts_false_negatives_at_each_models_own_threshold():
    rng = np.random.default_rng(0)
    labels = np.array([1] * 40 + [0] * 200)
    ref = np.concatenate([rng.uniform(0.6, 1.0, 40), rng.uniform(0.0, 0.7, 200)])
    same = judge(labels, ref, ref >= 0.6, ref, ref >= 0.6, rng)
    assert same.accepted and same.fn_delta_interval == (0.0, 0.0)
    worse = ref.copy()
    worse[:15] = 0.05  # 15 positives now score below every negative
    verdict = judge(labels, ref, ref >= 0.6, worse, worse >= 0.6, rng)
    assert not verdict.accepted and verdict.false_negatives == 15 and verdict.fn_delta_interval[0] > 0


def test_compress_save_load_moderate(caltech, ray_local, planted, tmp_path):
    from ngt_ray.job.pipeline import ModerationConfig, run_moderation

    stem = tmp_path / "tiny-compressed"
    report = compress(CompressConfig(
        model=TREE, output=stem, data=caltech, prune_ratio=0.25, prune_steps=1, easier_steps=1,
        finetune_steps=8, groups_per_step=4, acceptance_sizes=(2,), acceptance_groups=40, calibration_sizes=(1, 2, 4),
        val_groups=40, max_negatives=40, latency_batch=4, device="cpu",
    ))
    saved = json.loads((tmp_path / "tiny-compressed.json").read_text())
    assert saved["compression"]["from"] == TREE.name
    assert (tmp_path / "tiny-compressed-report.md").read_text().count("\n| ") == len(report["steps"]) + 2
    assert report["steps"][0]["step"] == "original" and len(report["steps"]) >= 2
    _, card = load_checkpoint(stem)
    assert card.architecture == saved["architecture"] and sorted(card.calibration) == [1, 2, 4]
    assert report["final"]["macs_per_image"] <= report["steps"][0]["macs_per_image"]

    out = tmp_path / "out"
    stats = run_moderation(ModerationConfig(input=str(planted.root), output=str(out), model=str(stem),
                                            measure_time=False))
    flags = pq.read_table(out / "flags")
    assert flags.num_rows == stats["images"] == planted.count
    assert stats["errors"] == 0 and stats["model"] == stem.name
