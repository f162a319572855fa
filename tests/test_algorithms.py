"""Group-testing algorithms against a perfect oracle, and the cost model behind ``--group-size auto``."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ngt_ray.grouptesting.algorithms import ALGORITHMS, oracle_scorer, screen, split_halves
from ngt_ray.grouptesting.calibration import ScreenQuality
from ngt_ray.grouptesting.cost_table import StageCosts
from ngt_ray.grouptesting.planning import PrevalenceEstimate, choose_group_size, expected_cost, group_size_that_pays


def _truth(n: int, positives: list[int]) -> np.ndarray:
    truth = np.zeros(n, dtype=bool)
    truth[[p % n for p in positives]] = True
    return truth


@settings(max_examples=200, deadline=None)
@given(n=st.integers(1, 300), log_k=st.integers(0, 5), positives=st.lists(st.integers(0, 10_000), max_size=12),
       seed=st.integers(0, 2**32 - 1))
def test_halving_with_a_perfect_test_recovers_exactly_the_positives(n, log_k, positives, seed):
    k, truth = 2**log_k, _truth(n, positives)
    halving = screen("halving", n, k, np.random.default_rng(seed), oracle_scorer(truth), lambda s: 0.5)
    dorfman = screen("dorfman", n, k, np.random.default_rng(seed), oracle_scorer(truth), lambda s: 0.5)
    assert np.array_equal(halving.candidate, truth)
    assert dorfman.candidate[truth].all()  # Dorfman keeps whole groups: a superset
    assert [g.tolist() for g in halving.groups] == [g.tolist() for g in dorfman.groups]
    for g in halving.groups:
        d = int(truth[g].sum())
        # halving: each positive adds at most two tests per level, plus its own confirmation
        halving_tests = float(halving.tests[g].sum()) + d
        dorfman_tests = float(dorfman.tests[g].sum()) + (len(g) if d else 0)
        assert halving_tests <= 1 + d * (2 * math.ceil(math.log2(len(g))) + 1) + 1e-9
        # where the bound says halving wins outright: 2 ceil(log2 k) + 2 < k + 1 (a last, partial
        # group of 9 ties: both spend 10 tests)
        if d == 1 and 2 * math.ceil(math.log2(len(g))) + 2 < len(g) + 1:
            assert halving_tests < dorfman_tests


@settings(max_examples=100, deadline=None)
@given(n=st.integers(1, 200), k=st.integers(1, 32), positives=st.lists(st.integers(0, 10_000), max_size=8),
       seed=st.integers(0, 2**32 - 1))
def test_overlap_keeps_every_positive_and_books_every_test(n, k, positives, seed):
    truth = _truth(n, positives)
    result = screen("overlap", n, k, np.random.default_rng(seed), oracle_scorer(truth), lambda s: 0.5)
    assert result.candidate[truth].all()
    assert result.n_tests == 2 * math.ceil(n / k) and result.rounds == 1
    assert math.isclose(result.cost(lambda s: 10.0).sum(), 10.0 * result.n_tests)
    assert math.isclose(result.cost(lambda s: s).sum(), 2.0 * n)  # every item sits in exactly two tests


def test_rounds_batch_every_group_of_a_round_into_one_scorer_call():
    calls = []
    truth = _truth(64, [3, 40])

    def scorer(groups):
        calls.append(len(groups))
        return oracle_scorer(truth)(groups)

    result = screen("halving", 64, 16, np.random.default_rng(0), scorer, lambda s: 0.5)
    assert len(calls) == result.rounds == 1 + 4  # 16 -> 8 -> 4 -> 2 -> 1
    assert calls[0] == 4 and all(c <= 4 for c in calls[1:])


def _quality(member_fpr: float) -> ScreenQuality:
    """Each negative member makes a negative group test positive with probability ``member_fpr``."""
    sizes = [1, 2, 4, 8, 16, 32]
    return ScreenQuality({s: 1.0 for s in sizes}, {s: 1 - (1 - member_fpr) ** s for s in sizes})


def test_auto_group_size_follows_dorfman_theory_for_a_perfect_test():
    # perfect test, free embedding, a group test costs what an individual test costs: classic Dorfman,
    # optimum k near 1/sqrt(p)
    costs = StageCosts(embed=0.0, group={s: 1.0 for s in (1, 2, 4, 8, 16, 32)}, confirm=1.0)
    sizes = [1, 2, 4, 8, 16, 32]
    assert choose_group_size("dorfman", sizes, 0.001, costs, _quality(0.0)) == 32
    assert choose_group_size("dorfman", sizes, 0.05, costs, _quality(0.0)) == 4
    assert math.isclose(expected_cost("dorfman", 32, 0.001, costs, _quality(0.0)), 1 / 32 + 1 - 0.999**32)
    # a test whose false positives grow with the group makes large groups pointless
    assert choose_group_size("dorfman", sizes, 0.001, costs, _quality(0.1)) == 4
    assert expected_cost("halving", 32, 0.001, costs, _quality(0.0)) < expected_cost("dorfman", 32, 0.001, costs,
                                                                                      _quality(0.0))


def test_auto_does_not_screen_where_screening_would_cost_more_than_confirming_everything():
    # a screen at a quarter of the confirmation's cost per image, shared stages free
    costs = StageCosts(embed=0.25, group={s: 0.0 for s in (1, 2, 4, 8)}, confirm=1.0)
    sizes = [1, 2, 4, 8]
    sharp = ScreenQuality({s: 1.0 for s in sizes}, {s: 0.05 for s in sizes})
    blunt = ScreenQuality({s: 1.0 for s in sizes}, {s: 0.9 for s in sizes})  # passes 90 % of negative groups
    assert group_size_that_pays("dorfman", sizes, 0.01, costs, sharp) in sizes
    assert group_size_that_pays("dorfman", sizes, 0.01, costs, blunt) is None
    assert expected_cost("dorfman", 1, 0.01, costs, blunt) > 1.0  # what 0 avoids
    assert choose_group_size("dorfman", sizes, 0.01, costs, blunt) in sizes  # without the option: a size


def test_prevalence_estimate_converges_on_simulated_groups():
    rng = np.random.default_rng(0)
    quality = ScreenQuality({8: 0.95}, {8: 0.2})
    est = PrevalenceEstimate(prior=0.05)
    for _ in range(200):
        holds = rng.random((100, 8)) < 0.01
        positive = np.where(holds.any(axis=1), rng.random(100) < 0.95, rng.random(100) < 0.2)
        est.update(8, 100, int(positive.sum()), quality)
    assert est.value == pytest.approx(0.01, abs=0.002)


@settings(max_examples=200, deadline=None)
@given(n=st.integers(1, 300), log_k=st.integers(0, 5), positives=st.lists(st.integers(0, 10_000), max_size=12),
       seed=st.integers(0, 2**32 - 1))
def test_halve_once_keeps_every_positive_between_halving_and_dorfman(n, log_k, positives, seed):
    """The registry's worked example: one class, its registration, this oracle test."""
    k, truth = 2**log_k, _truth(n, positives)
    runs = {name: screen(name, n, k, np.random.default_rng(seed), oracle_scorer(truth), lambda s: 0.5)
            for name in ("dorfman", "halve-once", "halving")}
    once = runs["halve-once"]
    assert once.candidate[truth].all() and once.rounds <= 3
    assert runs["halving"].candidate.sum() <= once.candidate.sum() <= runs["dorfman"].candidate.sum()
    for g in once.groups:  # a candidate sits in a positive half of a positive group, and only there
        for half in split_halves(g) if len(g) > 1 else [g]:
            assert once.candidate[half].all() == truth[half].any()


@pytest.mark.parametrize("name", list(ALGORITHMS))
def test_every_registered_algorithm_misses_no_positive_of_a_perfect_test_and_costs_sensibly(name):
    rng = np.random.default_rng(0)
    truth = rng.random(500) < 0.02
    result = screen(name, 500, 8, np.random.default_rng(1), oracle_scorer(truth), lambda s: 0.5)
    assert result.candidate[truth].all() and result.n_tests >= len(result.groups)
    costs = StageCosts(embed=0.1, group={s: 0.3 for s in (1, 2, 4, 8)}, confirm=1.0)
    perfect = ScreenQuality({s: 1.0 for s in (1, 2, 4, 8)}, {s: 0.0 for s in (1, 2, 4, 8)})
    cost = expected_cost(name, 8, 0.01, costs, perfect)
    assert costs.embed < cost < costs.embed + costs.confirm  # cheaper than confirming everything
    with pytest.raises(ValueError, match="algorithm must be one of"):
        screen("bogus", 10, 2, rng, oracle_scorer(truth[:10]), lambda s: 0.5)
