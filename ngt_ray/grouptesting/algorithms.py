"""Group-testing algorithms over any scorer, one class each, registered by name.

Each algorithm screens ``n`` items with group tests and leaves a set of *candidates* for the
final individual confirmation (``screen``), and knows its expected cost per item for the
``--group-size auto`` planner (``expected_cost``). The scorer is called once per round with every
sub-group of that round, so a model scores them in one batched forward pass; with cached
per-image embeddings a halving retest costs only the shared (post-merge) stages. Kept free of
torch and Ray so the same code runs in the model actor, in the evaluation job and against a
perfect oracle in tests.

Adding an algorithm is one class with ``@register``: the CLI's choices, the planner and the job
read ``ALGORITHMS``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import numpy as np

from ngt_ray.grouptesting.grouping import form_groups

if TYPE_CHECKING:
    from ngt_ray.grouptesting.calibration import ScreenQuality
    from ngt_ray.grouptesting.cost_table import StageCosts

__all__ = ["ALGORITHMS", "GroupTestingAlgorithm", "Screening", "get_algorithm", "per_member", "register", "screen",
           "split_halves"]

Scorer = Callable[[list[np.ndarray]], np.ndarray]  # member-index arrays -> one score per group
Thresholds = Callable[[int], float]  # group size -> threshold on the score
Costs = Callable[[int], float]  # group size -> cost of one test of that size


@dataclass
class Screening:
    """Per item (arrays of length n) plus totals of one screening run."""

    candidate: np.ndarray  # bool: not cleared by any test -> individual confirmation
    group: np.ndarray  # int: index of the item's first-round group (first partition for overlap)
    groups: list[np.ndarray]  # first-round groups, by index
    group_score: np.ndarray  # float: the first-round group's score
    score: np.ndarray  # float: score of the last test the item took part in (overlap: the lower of two)
    share: dict[int, np.ndarray]  # per tested size: sum of 1/size over the item's tests of that size
    rounds: int
    decided_in_round_one: np.ndarray  # bool: cleared by its first-round group(s)

    @property
    def tests(self) -> np.ndarray:
        """Per item: its share of the tests (sums to the number of tests)."""
        return sum(self.share.values(), np.zeros_like(self.score))

    @property
    def n_tests(self) -> int:
        return round(float(self.tests.sum()))

    def cost(self, per_test: Costs) -> np.ndarray:
        """Per item: its share of the tests' cost, ``per_test(size)`` for one test of that size."""
        return sum((per_test(size) * share for size, share in self.share.items()), np.zeros_like(self.score))


def per_member(n: int, groups: list[np.ndarray], values: np.ndarray, fill: float | int = np.nan,
               dtype: type = np.float64) -> np.ndarray:
    """Length-``n`` array holding, for each member of each group, its group's value (``fill``
    elsewhere): one scatter over the concatenated groups instead of a Python step per group."""
    out = np.full(n, fill, dtype=dtype)
    if groups:
        sizes = np.fromiter(map(len, groups), dtype=np.int64, count=len(groups))
        out[np.concatenate(groups)] = np.repeat(np.asarray(values), sizes)
    return out


def split_halves(members: np.ndarray) -> list[np.ndarray]:
    """A group's two halves (the first takes the odd one out)."""
    mid = -(-len(members) // 2)
    return [members[:mid], members[mid:]]


class _Ledger:
    """Runs rounds of tests and books each test's share onto its members."""

    def __init__(self, n: int, score: Scorer, threshold: Thresholds) -> None:
        self.n, self.score_fn, self.threshold = n, score, threshold
        self.score = np.full(n, np.nan, dtype=np.float64)
        self.share: dict[int, np.ndarray] = {}
        self.rounds = 0

    def run(self, groups: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """Test ``groups`` in one round; return their scores and which were positive.

        Bookkeeping is vectorised over the round (one threshold look-up per distinct size), so a
        round of thousands of groups costs array operations, not a Python step per group.
        """
        if not groups:
            return np.zeros(0), np.zeros(0, dtype=bool)
        scores = np.asarray(self.score_fn(groups), dtype=np.float64)
        if scores.shape != (len(groups),):
            raise ValueError(f"scorer returned shape {scores.shape} for {len(groups)} groups")
        sizes = np.fromiter(map(len, groups), dtype=np.int64, count=len(groups))
        members = np.concatenate(groups)
        distinct, which = np.unique(sizes, return_inverse=True)
        positive = scores >= np.array([self.threshold(int(s)) for s in distinct])[which]
        self.score[members] = np.repeat(scores, sizes)
        member_size = np.repeat(sizes, sizes)
        for size in distinct:
            rows = members[member_size == size]
            np.add.at(self.share.setdefault(int(size), np.zeros(self.n)), rows, 1.0 / size)
        self.rounds += 1
        return scores, positive


class GroupTestingAlgorithm:
    """One way to screen items with group tests. Subclasses set ``name``, ``rounds`` (decide the
    candidates of the first-round ``groups``) and ``expected_cost``."""

    name: ClassVar[str]

    def screen(self, n: int, k: int, rng: np.random.Generator, score: Scorer, threshold: Thresholds,
               min_size: int = 1) -> Screening:
        """Screen ``n`` items in groups of ``k`` (random membership from ``rng``)."""
        if min_size < 1:
            raise ValueError(f"min_size must be >= 1, got {min_size}")
        ledger = _Ledger(n, score, threshold)
        groups = form_groups(n, k, rng)
        group = per_member(n, groups, np.arange(len(groups)), fill=-1, dtype=np.int64)
        candidate, group_scores, cleared_first = self.rounds(ledger, groups, n, k, rng, min_size)
        return Screening(candidate, group, groups, per_member(n, groups, group_scores), ledger.score, ledger.share,
                         ledger.rounds, cleared_first)

    def rounds(self, ledger: _Ledger, groups: list[np.ndarray], n: int, k: int, rng: np.random.Generator,
               min_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Test ``groups`` and whatever follows; return per item ``candidate``, the first-round
        groups' scores, and per item whether the first round cleared it."""
        raise NotImplementedError

    def expected_cost(self, k: int, p: float, costs: StageCosts, quality: ScreenQuality, min_size: int = 1) -> float:
        """Expected cost per item of screening plus confirmation at prevalence ``p``, in the units
        of ``costs``, with tests behaving as ``quality`` says (independent given the content)."""
        raise NotImplementedError


ALGORITHMS: dict[str, GroupTestingAlgorithm] = {}


def register(cls: type[GroupTestingAlgorithm]) -> type[GroupTestingAlgorithm]:
    """Class decorator: make an algorithm available by its ``name``."""
    if cls.name in ALGORITHMS:
        raise ValueError(f"an algorithm named {cls.name!r} is already registered")
    ALGORITHMS[cls.name] = cls()
    return cls


def get_algorithm(name: str) -> GroupTestingAlgorithm:
    try:
        return ALGORITHMS[name]
    except KeyError:
        raise ValueError(f"algorithm must be one of {tuple(ALGORITHMS)}, got {name!r}") from None


def screen(algorithm: str, n: int, k: int, rng: np.random.Generator, score: Scorer, threshold: Thresholds,
           min_size: int = 1) -> Screening:
    """Screen ``n`` items in groups of ``k`` with the algorithm registered as ``algorithm``."""
    return get_algorithm(algorithm).screen(n, k, rng, score, threshold, min_size)


class _Splitting(GroupTestingAlgorithm):
    """Adaptive rounds: a positive group larger than ``min_size`` is split in halves that are tested
    in the next round, at most ``max_splits`` times; members of positive groups that are not split
    further are candidates. ``max_splits = 0`` is Dorfman's two rounds."""

    max_splits: ClassVar[int | None] = None  # None: down to groups of min_size

    def rounds(self, ledger, groups, n, k, rng, min_size):
        candidate = np.zeros(n, dtype=bool)
        group_scores, positive = ledger.run(groups)
        cleared_first = ~per_member(n, groups, positive, fill=False, dtype=bool)
        pending = [g for g, p in zip(groups, positive) if p]
        splits = 0
        while pending:
            last = self.max_splits is not None and splits >= self.max_splits
            final = [g for g in pending if last or len(g) <= min_size]
            if final:
                candidate[np.concatenate(final)] = True
            halves = [] if last else [h for g in pending if len(g) > min_size for h in split_halves(g)]
            _, positive = ledger.run(halves)
            pending = [g for g, p in zip(halves, positive) if p]
            splits += 1
        return candidate, group_scores, cleared_first

    def expected_cost(self, k, p, costs, quality, min_size=1):
        pos = quality.positive

        def rest(size: int, splits: int) -> float:
            """Expected cost after a positive test of ``size``: confirm it, or test its halves."""
            if size <= min_size or (self.max_splits is not None and splits >= self.max_splits):
                return size * costs.confirm
            half = -(-size // 2)
            p_half = min(1.0, pos(half, p) / max(pos(size, p), 1e-12))
            return 2 * (costs.group_cost(half) + p_half * rest(half, splits + 1))

        return costs.embed + (costs.group_cost(k) + pos(k, p) * rest(k, 0)) / k


@register
class Dorfman(_Splitting):
    """Two rounds: every member of a positive group is confirmed one by one."""

    name = "dorfman"
    max_splits = 0


@register
class Halving(_Splitting):
    """Recursive halving of positive groups on the cached embeddings, down to ``min_size``."""

    name = "halving"


@register
class HalveOnce(_Splitting):
    """Three rounds: a positive group is split once, and the members of positive halves are
    confirmed. Between Dorfman and halving: one batched retest round instead of log2(k), so fewer
    small forwards per batch, at the price of confirming whole halves."""

    name = "halve-once"
    max_splits = 1


@register
class Overlap(GroupTestingAlgorithm):
    """Non-adaptive: every item sits in two groups of two independent partitions, all tested in one
    round; an item is a candidate when both its groups are positive."""

    name = "overlap"

    def rounds(self, ledger, groups, n, k, rng, min_size):
        second = form_groups(n, k, rng)
        scores, positive = ledger.run(groups + second)
        first_pos = per_member(n, groups, positive[: len(groups)], fill=False, dtype=bool)
        second_pos = per_member(n, second, positive[len(groups):], fill=False, dtype=bool)
        candidate = first_pos & second_pos
        group_scores = scores[: len(groups)]
        # the deciding score is the lower of the two (one negative group clears the item)
        ledger.score = np.minimum(ledger.score, per_member(n, groups, group_scores))
        return candidate, group_scores, ~candidate

    def expected_cost(self, k, p, costs, quality, min_size=1):
        rec = quality.recall_at(k)
        both = p * rec**2 + (1 - p) * quality.positive(k - 1, p) ** 2 if k > 1 else quality.positive(1, p) ** 2
        return costs.embed + 2 * costs.group_cost(k) / k + both * costs.confirm


def oracle_scorer(positives: Sequence[bool]) -> Scorer:
    """A perfect test: 1 when a group holds a positive, else 0 (for tests and theory checks)."""
    truth = np.asarray(positives, dtype=bool)
    return lambda groups: np.array([float(truth[g].any()) for g in groups])
