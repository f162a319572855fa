"""Threshold calibration for a target recall."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from ngt_ray.grouptesting.calibration import threshold_for_recall


@settings(max_examples=200)
@given(st.lists(st.floats(0, 1, allow_nan=False), min_size=1, max_size=300), st.floats(0.01, 1.0))
def test_calibration_meets_target_recall_and_is_tightest(scores, target):
    s = np.array(scores)
    t = threshold_for_recall(s, target)
    assert (s >= t).mean() >= target - 1e-12
    higher = s[s > t]
    if higher.size:  # any higher threshold would miss the target
        assert (s >= higher.min()).mean() < target
