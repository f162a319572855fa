"""Training writes calibrated checkpoints that load (a full, small training run on real photos)."""

from __future__ import annotations

import pytest
import torch

from ngt_ray.nets.checkpoint import load_checkpoint
from ngt_ray.tools.train import TrainConfig, train
from ngt_ray.training.heads import PENALTIES


def test_training_writes_calibrated_loadable_checkpoints(caltech, tmp_path):
    cards = train(TrainConfig(data=caltech, output=tmp_path, design="tree", max_negatives=24, steps=2,
                              val_groups=16, epochs=20, screen_size=96, calibration_sizes=(1, 2, 8), paste=12,
                              distill=0.5, imagenet_classes=(763,), degrade=0.25))
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
    # copy-paste positives: revolver product shots pasted into the split's own scenes, 12 on train, 4 on val
    made = cards["group"].training["data"]["composites"]
    assert made["train"]["composites"] == 12 and made["val"]["composites"] == 4 and made["train"]["cut_outs"] > 0
    assert cards["individual"].validation["composites"]["composites"] == 4
    assert cards["group"].training["distill"] == 0.5  # trained against the individual model's verdicts too
    assert 0 <= cards["individual"].validation["composites"]["auroc"] <= 1
    # the individual's head keeps ImageNet's "revolver" as a prior, its penalty chosen on val
    individual = cards["individual"]
    assert individual.head == {"kind": "imagenet-prior", "classes": [763]}
    assert individual.training["head_fit"]["penalty"] in PENALTIES
    assert individual.training["data"]["degraded_copies"]["train"] > 0  # dark, blurred copies of train photos


@pytest.mark.usefixtures("ray_local")
def test_training_a_users_own_class_from_folders_gives_models_the_job_uses(caltech, planted, tmp_path):
    from ngt_ray.job.pipeline import ModerationConfig, run_moderation
    from ngt_ray.training.datasets import caltech_split

    pos, neg = tmp_path / "data" / "handguns", tmp_path / "data" / "other"
    for folder in (pos, neg):
        folder.mkdir(parents=True)
    items = caltech_split(caltech, "train")
    for path in [p for p, y in items if y][:20]:
        (pos / path.name).write_bytes(path.read_bytes())
    for path in [p for p, y in items if not y][::60][:40]:
        (neg / f"{path.parent.name}-{path.name}").write_bytes(path.read_bytes())
    cards = train(TrainConfig(positives=(str(pos),), negatives=(str(neg),), positive_class="handgun",
                              output=tmp_path / "models", design="tree", steps=2, epochs=20, val_groups=8,
                              screen_size=96, calibration_sizes=(1, 2), paste=0))
    assert {card.positive_class for card in cards.values()} == {"handgun"}
    assert cards["group"].training["data"]["splits"]["val"]["positives"] == 4
    stems = sorted(p.stem for p in (tmp_path / "models").glob("*.json"))
    assert stems == ["handgun-lite0-individual", "handgun-lite0-tree-k8"]
    stats = run_moderation(ModerationConfig(
        input=str(planted.root), output=str(tmp_path / "out"), measure_time=False, group_size=2,
        model=str(tmp_path / "models" / "handgun-lite0-tree-k8"),
        individual_model=str(tmp_path / "models" / "handgun-lite0-individual")))
    assert stats["images"] == planted.count and stats["model"] == "handgun-lite0-tree-k8"


def test_a_cascade_screen_is_a_head_on_a_low_resolution_forward_calibrated_on_real_flagged_positives(caltech, tmp_path):
    cards = train(TrainConfig(data=caltech, output=tmp_path, design="cascade", max_negatives=24, val_groups=16,
                              epochs=20, screen_size=96, calibration_sizes=(1, 2), paste=6, imagenet_classes=(763,),
                              target_recall=0.98))
    model, card = load_checkpoint(tmp_path / "revolver-lite0-cascade-k1")
    assert card == cards["group"] and card.design == "cascade" and card.input_size == 96
    assert card.merge_depths == [len(model.backbone)] and card.head == cards["individual"].head
    assert card.training["calibration_positives"]["real"] > 0
    for size, row in card.calibration.items():
        assert row.recall >= 0.98
        rate, low, high = card.validation["calibration"]["pass_rates"][str(size)]["0.9"]
        assert 0 <= low <= high <= 1 and 0 <= rate <= 1
    x = torch.randint(0, 256, (4, 3, 96, 96), dtype=torch.uint8)
    with torch.no_grad():
        assert model(x).shape == (4,)
