"""Source families: numbered runs and near-duplicates share a split."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from ngt_ray.training.families import difference_hash, family_splits, name_family, near_duplicate_families


def _jpeg(pixels: np.ndarray, quality: int = 90) -> bytes:
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "JPEG", quality=quality)
    return out.getvalue()


def test_numbered_runs_from_one_place_share_a_family_and_random_ids_stand_alone():
    assert name_family("a/armas--1295-_jpg.rf.08e0b3e3e341b56abade6917b1f93390.jpg") == \
        name_family("b/armas--1203-_jpg.rf.79bbfc4bc9af6e3f81d70aaf761767b4.jpg")
    assert name_family("armas--1295-_jpg.rf.08e0b3e3e341b56abade6917b1f93390.jpg") != \
        name_family("armas--203-_jpg.rf.05fde2784232e7c9c6f026603fc6e839.jpg")
    assert name_family("KravMagaTraining467_jpg.rf.c692cb69b375733b83625162db2415d8.jpg").startswith("KravMagaTraining")
    assert name_family("0M5HFY9RW4C9_jpg.rf.5e08c5ab36e3432f10539eba780aee1f.jpg") == "0M5HFY9RW4C9"


def test_a_reencoded_resized_copy_is_a_near_duplicate_and_joins_its_original():
    rng = np.random.default_rng(0)
    # a grid of blocks whose left-right neighbours differ clearly: every bit of the hash is meant
    grid = np.cumsum(rng.choice([-60, 60], size=(8, 9)), axis=1) + 128
    photo = np.repeat(np.repeat(np.clip(grid, 0, 255), 15, axis=0), 18, axis=1).astype(np.uint8)
    photo = np.stack([photo] * 3, axis=-1)
    copy = np.asarray(Image.fromarray(photo).resize((100, 75)))
    other = photo[::-1].copy()
    hashes = [difference_hash(_jpeg(photo)), difference_hash(_jpeg(copy, 60)), difference_hash(_jpeg(other))]
    families = near_duplicate_families(["x1", "y7", "z3"], hashes, ["s", "s", "s"])
    assert families[0] == families[1] == "x1" and families[2] == "z3"
    # the same pictures from two sources are not joined: sources are split on their own
    assert near_duplicate_families(["x1", "y7"], hashes[:2], ["s", "t"]) == ["x1", "y7"]


def test_splits_follow_families_and_a_dominant_family_trains():
    families = [f"f{i % 50}" for i in range(1000)] + ["big"] * 200
    splits = family_splits(families, ["s"] * len(families))
    by_family: dict[str, set[str]] = {}
    for family, split in zip(families, splits):
        by_family.setdefault(family, set()).add(split)
    assert all(len(s) == 1 for s in by_family.values())
    assert by_family["big"] == {"train"}
    shares = {s: splits.count(s) / len(splits) for s in ("train", "val", "test")}
    assert 0.45 < shares["train"] < 0.85 and shares["val"] > 0.05 and shares["test"] > 0.05
