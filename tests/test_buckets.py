"""One rule for simulated buckets: the demo's, the evaluation's and the benchmark's."""

from __future__ import annotations

import numpy as np
import pytest

from ngt_ray.grouptesting.buckets import plant


def test_planting_keeps_the_prevalence_and_shrinks_negatives_when_positives_run_out():
    labels = np.array([1] * 10 + [0] * 990)
    pos, neg = plant(labels, 0.01, np.random.default_rng(0))
    assert len(neg) == 990 and len(pos) == 10 and (labels[pos] == 1).all() and (labels[neg] == 0).all()
    pos, neg = plant(labels, 0.05, np.random.default_rng(0))  # wants 52 positives, has 10
    assert len(pos) == 10 and len(neg) == 190 and len(set(neg.tolist())) == 190
    pos, neg = plant(labels, 0.01, np.random.default_rng(0), negatives=99)
    assert (len(pos), len(neg)) == (1, 99)
    again = plant(labels, 0.01, np.random.default_rng(0), negatives=99)
    assert all((a == b).all() for a, b in zip((pos, neg), again))  # the seed decides


def test_a_fixed_total_reuses_photos_in_order():
    labels = np.array([0, 1, 0, 0, 1])
    pos, neg = plant(labels, 0.1, np.random.default_rng(0), total=20)
    assert (len(pos), len(neg)) == (2, 18) and pos.tolist() == [1, 4]
    assert neg[:4].tolist() == [0, 2, 3, 0]
    with pytest.raises(ValueError, match="prevalence"):
        plant(labels, 1.5, np.random.default_rng(0))
