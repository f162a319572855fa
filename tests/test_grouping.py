"""Group formation and group ids."""

from __future__ import annotations

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from ngt_ray.grouptesting.grouping import form_groups, group_ids, key_hashes


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
    assert ((ids >= 0) & (ids < 2**63)).all() and ids.dtype == np.int64
