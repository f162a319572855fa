"""Merge designs on staged backbones: a group of one is the image, merges are exact, MACs add up."""

from __future__ import annotations

import pytest
import torch

from ngt_ray.grouptesting.cost_table import plan_sizes
from ngt_ray.nets.backbone import build_backbone
from ngt_ray.nets.model import GroupTestingModel, merge_max, merge_segments
from ngt_ray.nets.profiling import count_macs, stage_macs


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


def test_a_cascade_runs_every_stage_per_image_and_a_group_of_one_is_the_image():
    from ngt_ray.nets.backbone import build_backbone
    from ngt_ray.nets.model import DESIGNS, GroupTestingModel

    backbone = build_backbone()
    n = len(backbone)
    with pytest.raises(ValueError, match="every stage per image"):
        DESIGNS["cascade"].check((12,), n)
    model = GroupTestingModel(backbone, n, "cascade").eval()
    x = torch.randint(0, 256, (3, 3, 96, 96), dtype=torch.uint8)
    with torch.no_grad():
        h = model.embed(x)
        assert h.shape == (3, backbone.spec.feature_dim)  # the pooled features: nothing is left to share
        torch.testing.assert_close(model.score_groups(h, [1, 1, 1]), model.head(backbone(x)).squeeze(1))
        # a group of three is the max over the members' pooled features
        torch.testing.assert_close(model.score_groups(h, [3]), model.head(h.amax(0, keepdim=True)).squeeze(1))
