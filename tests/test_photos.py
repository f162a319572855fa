"""Every verb that reads labelled photos takes them from one place: a manifest, folders or Caltech-101."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from ngt_ray.cli import build_parser, main
from ngt_ray.nets.checkpoint import default_screen_model, read_card
from ngt_ray.options import Photos, from_args
from ngt_ray.tools.benchmark import make_jpeg_bucket
from ngt_ray.training.labelled import LabelledSet, labelled_photos

_VERBS = {"train": [], "calibrate": ["--model", "m"], "compress": ["--model", "m", "--output", "o"],
          "evaluate": [], "benchmark": [], "demo": []}


@pytest.mark.parametrize("verb", sorted(_VERBS))
def test_every_verb_that_reads_labelled_photos_takes_the_photos_options(verb):
    from ngt_ray.cli import _COMMANDS

    config = next(c[3][0][0] for c in _COMMANDS if c[0] == verb)
    args = build_parser().parse_args([verb, *_VERBS[verb], "--manifest", "s3://b/m.parquet", "--s3-endpoint",
                                      "http://s3", "--data", "/c"])
    cfg = from_args(config, args)
    assert cfg.photos == Photos(manifest="s3://b/m.parquet", s3_endpoint="http://s3", data=Path("/c"))
    args = build_parser().parse_args([verb, *_VERBS[verb], "--positives", "a/", "s3://b/p/", "--negatives", "n/"])
    assert from_args(config, args).photos == Photos(positives=["a/", "s3://b/p/"], negatives=["n/"])


@pytest.fixture(scope="module")
def manifest(caltech, tmp_path_factory):
    """A small manifest of real photos: a few revolvers and other Caltech photos per split."""
    caltech_set = LabelledSet.from_caltech(caltech)
    rows = []
    for split, (n_pos, n_neg) in {"train": (5, 16), "val": (5, 16), "test": (3, 12)}.items():
        items = caltech_set.split(split)
        negatives = [u for u, y in items if not y]
        rows += [(u, 1, split) for u, y in items if y][:n_pos]
        rows += [(u, 0, split) for u in negatives[:: len(negatives) // n_neg][:n_neg]]
    path = tmp_path_factory.mktemp("manifest") / "small.csv"
    path.write_text("uri,label,split\n" + "".join(f"{u},{y},{s}\n" for u, y, s in rows))
    return path


def test_calibrate_and_compress_run_on_a_manifest_from_the_command_line(manifest, tmp_path):
    screen = default_screen_model("tree", compressed=False)
    copy = tmp_path / screen.name
    for suffix in (".pt", ".json"):
        shutil.copyfile(f"{screen}{suffix}", f"{copy}{suffix}")
    assert main(["calibrate", "--model", str(copy), "--manifest", str(manifest), "--sizes", "1,2",
                 "--groups", "20", "--device", "cpu"]) == 0
    card = read_card(copy)
    assert sorted(card.calibration) == [1, 2] and card.validation["calibration"]["split"] == f"{manifest} val"

    out = tmp_path / "compressed"
    assert main(["compress", "--model", str(screen), "--output", str(out), "--manifest", str(manifest),
                 "--prune-steps", "1", "--finetune-steps", "2", "--easier-steps", "0", "--groups-per-step", "4",
                 "--acceptance-sizes", "2", "--acceptance-groups", "20", "--calibration-sizes", "1,2",
                 "--val-groups", "20", "--latency-batch", "2", "--device", "cpu"]) == 0
    card = read_card(out)
    assert card.compression["from"] == screen.name and sorted(card.calibration) == [1, 2]
    assert card.validation["calibration"]["split"] == f"{manifest} val"
    report = json.loads((tmp_path / "compressed-report.json").read_text())
    assert report["config"]["manifest"] == str(manifest) and report["steps"][0]["step"] == "original"


def test_the_benchmark_bucket_is_made_from_the_test_split_of_any_labelled_photos(manifest, tmp_path):
    photos = labelled_photos(Photos(manifest=str(manifest)))
    root, positives = make_jpeg_bucket(photos, tmp_path / "bucket", 8, 0.25, 64, 48, workers=1)
    assert len(list(root.glob("*.jpg"))) == 8 and len(positives) == 2
