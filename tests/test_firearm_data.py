"""The firearm manifest splits by source family, and the packaged model beats ImageNet's zero-shot head
on in-scene photos it never saw."""

from __future__ import annotations

import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import torch

from ngt_ray.grouptesting.calibration import roc_auc
from ngt_ray.nets.checkpoint import DEFAULT_INDIVIDUAL_MODEL, load_checkpoint
from ngt_ray.nets.heads import zero_shot_head
from ngt_ray.nets.model import GroupTestingModel
from ngt_ray.training.embeddings import embed_images

sys.path.insert(0, str(Path(__file__).parents[1] / "jobs"))
import firearm_manifest  # noqa: E402


@pytest.fixture(scope="module")
def manifest(real_scenes) -> list[dict]:
    return firearm_manifest.rows(real_scenes)


def test_no_family_straddles_splits_and_an_in_scene_test_split_exists(manifest):
    assert len({r["uri"] for r in manifest}) == len(manifest)
    splits = defaultdict(set)
    for r in manifest:
        splits[r["source"], r["family"]].add(r["split"])
    assert all(len(s) == 1 for s in splits.values())
    in_scene = [r for r in manifest if r["split"] == "test" and r["scene"] == "in_scene" and r["label"] == 1]
    assert len(in_scene) >= 100
    # frames of one knife video, and numbered runs of one scrape, are families of many photos
    assert max(sum(1 for r in manifest if r["family"] == f) for _, f in splits) >= 30
    # Caltech's own split is kept, so the Caltech demo's test photos are never trained on
    assert {r["split"] for r in manifest if r["source"] == "caltech101/revolver"} == {"train", "val", "test"}


def test_the_packaged_firearm_model_beats_imagenets_zero_shot_head_on_unseen_in_scene_photos(manifest):
    pos = sorted(r["uri"] for r in manifest if r["split"] == "test" and r["scene"] == "in_scene" and r["label"])[:40]
    # everyday scenes that look like the positives' world: streets, rooms, people, old film frames
    neg = sorted(r["uri"] for r in manifest if r["split"] == "test" and r["label"] == 0
                 and r["source"].startswith(("everyday/", "scenes")))[:40]
    items = [(u, 1) for u in pos] + [(u, 0) for u in neg]
    labels = np.array([y for _, y in items])
    model, card = load_checkpoint(DEFAULT_INDIVIDUAL_MODEL)
    pooled = GroupTestingModel(model.backbone, len(model.backbone), "cascade")  # embed: the pooled features
    features = embed_images(pooled, items, card.input_size, 32, torch.device("cpu")).float()
    with torch.no_grad():
        trained = model.head(features).squeeze(1).numpy()
        zero_shot = zero_shot_head(card.backbone, card.head["classes"])(features).squeeze(1).numpy()
    assert roc_auc(labels, trained) >= 0.9
    assert roc_auc(labels, trained) > roc_auc(labels, zero_shot)
