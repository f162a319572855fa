"""The closed set of model-call shapes: the ladder, padding that never leaks, warm-up, cold calls."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ngt_ray.grouptesting.algorithms import screen
from ngt_ray.nets.checkpoint import default_screen_model, load_checkpoint
from ngt_ray.nets.runtime import inference_context
from ngt_ray.nets.shapes import CallSizes, fix_shapes, size_ladder, warm_up
from ngt_ray.nets.stubs import StubModel

CPU = torch.device("cpu")


@given(st.integers(1, 2048))
def test_at_most_a_third_of_a_padded_call_is_padding_and_the_rungs_are_few(top):
    ladder = size_ladder(top)
    assert ladder[0] == 1 and ladder[-1] == top and list(ladder) == sorted(set(ladder))
    assert len(ladder) <= 2 * top.bit_length()
    for rows in range(1, top + 1):
        padded = next(r for r in ladder if r >= rows)
        assert 3 * (padded - rows) <= padded, (rows, padded)


@given(st.integers(1, 600), st.integers(1, 64), st.booleans())
def test_pieces_cover_every_row_once_at_sizes_of_the_set(n, top, raw):
    sizes = CallSizes.up_to(top, per_image=True)
    pieces = list(sizes.pieces(n, raw))
    assert sum(rows for _, rows, _ in pieces) == n
    assert [lo for lo, _, _ in pieces] == list(range(0, n, top))
    allowed = {top} if raw else set(sizes.ladder)
    assert all(padded in allowed and padded >= rows for _, rows, padded in pieces)


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 200), st.sampled_from([2, 4, 8, 16]), st.sampled_from(["halving", "dorfman", "overlap"]),
       st.integers(0, 2**31))
def test_no_algorithm_round_leaves_the_warmed_set(n, k, algorithm, seed):
    """Whatever the batch, k and algorithm, every call after warm-up has a warmed shape, and the
    padded calls return what the unpadded ones would."""
    model = StubModel(rate=0.2)
    ledger = fix_shapes(model, CallSizes.up_to(16, per_image=True))
    warm_up(model, 32, CPU, ledger, torch.inference_mode)
    x = torch.from_numpy(np.random.default_rng(seed).integers(0, 256, (n, 3, 32, 32), dtype=np.uint8))
    with torch.inference_mode():
        h = model.embed(x)
        free = StubModel(rate=0.2)
        torch.testing.assert_close(h, free.embed(x))

        def score(groups):
            idx = torch.from_numpy(np.concatenate(groups))
            got = model.score_groups(h[idx], [len(g) for g in groups])
            torch.testing.assert_close(got, free.score_groups(h[idx], [len(g) for g in groups]))
            return torch.sigmoid(got).numpy()

        screen(algorithm, n, k, np.random.default_rng(seed), score, lambda size: 0.5, 1)
    assert ledger.cold_calls == 0 and ledger.rows > 0


def test_a_call_outside_the_set_is_counted_cold():
    model = StubModel()
    ledger = fix_shapes(model, CallSizes.up_to(4))
    warm_up(model, 32, CPU, ledger, torch.inference_mode)
    assert len(ledger.warm) == len(size_ladder(4)) * 2  # embed and the merged groups, at each rung
    with torch.inference_mode():
        model.embed(torch.zeros((3, 3, 32, 32), dtype=torch.uint8))
        assert ledger.cold_calls == 0
        model.embed(torch.zeros((3, 3, 48, 48), dtype=torch.uint8))  # another input size: not warmed
    assert ledger.cold_calls == 1


def test_a_real_screen_and_confirmation_stay_in_the_set_through_halving():
    """The packaged tree screen (three merge depths, so three stage ranges per round) and its
    individual model: warm-up covers every range at every rung, and a halving pass meets no other."""
    screen_model, card = load_checkpoint(default_screen_model("tree"))
    screen_model.eval()
    ledger = fix_shapes(screen_model, CallSizes.up_to(8, per_image=True))
    record = warm_up(screen_model, 64, CPU, ledger, lambda: inference_context(CPU))
    ranges = len(card.merge_depths)  # merged groups run one range per merge depth
    assert record["model_call_shapes"] == 1 + ranges * len(size_ladder(8)) and record["warmup_seconds"] > 0
    x = torch.randint(0, 256, (21, 3, 64, 64), dtype=torch.uint8)
    with inference_context(CPU):
        h = screen_model.embed(x)

        def score(groups):
            idx = torch.from_numpy(np.concatenate(groups))
            return torch.sigmoid(screen_model.score_groups(h[idx], [len(g) for g in groups])).numpy()

        result = screen("halving", 21, 8, np.random.default_rng(0), score, lambda size: 0.0, 1)  # all positive
    assert result.candidate.all() and ledger.cold_calls == 0 and ledger.padded_rows > 0


@pytest.fixture(scope="module")
def thousand_photos(caltech, tmp_path_factory):
    from ngt_ray.tools.demo import build_bucket

    return build_bucket(caltech, tmp_path_factory.mktemp("thousand") / "bucket", prevalence=0.01, max_images=990)


def test_a_screened_run_on_1000_real_photos_makes_no_cold_model_call(thousand_photos, ray_local, tmp_path):
    from ngt_ray.job.pipeline import ModerationConfig, run_moderation

    stats = run_moderation(ModerationConfig(
        input=str(thousand_photos.root), output=str(tmp_path / "out"), group_size=8, algorithm="halving",
        model=str(default_screen_model("tree")), measure_time=False))
    flags = pq.read_table(tmp_path / "out" / "flags", columns=["uri", "decided_by"]).to_pylist()
    assert len(flags) == stats["images"] == thousand_photos.count >= 1000
    assert stats["group_tests"] > 0 and stats["retests"] < stats["images"]  # it screened
    assert stats["warmup_seconds"] > 0 and stats["warmed_actors"] >= 1
    assert stats["model_call_shapes"] > 0
    assert stats["cold_model_calls"] == 0
    assert 0 < stats["padded_share"] < 1 / 3


_COMPILED_WARM_UP = """
import json, torch
from ngt_ray.nets.checkpoint import default_screen_model, load_checkpoint
from ngt_ray.nets.runtime import accelerate, compile_cache_hits, inference_context
from ngt_ray.nets.shapes import CallSizes, fix_shapes, warm_up
cpu = torch.device("cpu")
model, card = load_checkpoint(default_screen_model("feature"))
model, applied = accelerate(model, cpu, 32, "compiled")
ledger = fix_shapes(model, CallSizes.up_to(2, per_image=True))
record = warm_up(model, 32, cpu, ledger, lambda: inference_context(cpu), repeats=2)
with inference_context(cpu):
    h = model.embed(torch.zeros((3, 3, 32, 32), dtype=torch.uint8))
    model.score_groups(h, [2, 1])
print(json.dumps({**record, "hits": compile_cache_hits(), "cold": ledger.cold_calls, **applied}))
"""


def test_compiled_actors_on_a_node_share_one_compile_cache(tmp_path):
    """--runtime compiled compiles every shape of the set during warm-up; a second process on the
    node loads the graphs the first compiled (counted by Inductor) instead of compiling again."""
    import json
    import os
    import subprocess
    import sys

    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "cache")}

    def warm_up_in_a_new_process() -> dict:
        done = subprocess.run([sys.executable, "-c", _COMPILED_WARM_UP], env=env, capture_output=True, text=True,
                              timeout=600)
        # a failure shows the process's own words: CalledProcessError would show only its exit status
        assert done.returncode == 0, done.stderr[-4000:]
        return json.loads(done.stdout.splitlines()[-1])

    first, second = warm_up_in_a_new_process(), warm_up_in_a_new_process()
    assert first["compile_mode"] == "default" and first["model_call_shapes"] == 1 + len(size_ladder(2))
    assert first["cold"] == second["cold"] == 0
    assert first["hits"] == 0 < second["hits"]
    assert first["compile_seconds"] > 0
