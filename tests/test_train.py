"""Training writes calibrated checkpoints that load (a full, small training run on real photos)."""

from __future__ import annotations

import torch

from ngt_ray.nets.checkpoint import (
    load_checkpoint,
)


def test_training_writes_calibrated_loadable_checkpoints(caltech, tmp_path):
    from ngt_ray.tools.train import TrainConfig, train

    cards = train(TrainConfig(data=caltech, output=tmp_path, design="tree", max_negatives=24, steps=2,
                              val_groups=16, epochs=20, screen_size=96, calibration_sizes=(1, 2, 8)))
    for kind, stem in (("individual", "revolver-lite0-individual"), ("group", "revolver-lite0-tree-k8")):
        model, card = load_checkpoint(tmp_path / stem)
        assert card == cards[kind]
        assert card.validation["recall"] >= card.validation["target_recall"]  # met on the fitted groups
        for size, row in card.calibration.items():  # and per calibrated size
            assert row.recall >= card.validation["target_recall"]
            assert card.threshold_for(size) == row.threshold
        x = torch.randint(0, 256, (8, 3, card.input_size, card.input_size), dtype=torch.uint8)
        with torch.no_grad():
            out = model.forward_groups(x, [8]) if kind == "group" else model(x)
        assert out.shape == ((1,) if kind == "group" else (8,))
    assert cards["group"].input_size == 96 and cards["individual"].input_size == 224
    assert sorted(cards["group"].calibration) == [1, 2, 8] and cards["group"].merge_depths == [4, 6, 8]
