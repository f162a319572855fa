"""Labelled images from folders, a manifest or Caltech-101, split once and for all by one rule."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from ngt_ray.options import Photos
from ngt_ray.training.datasets import caltech_split
from ngt_ray.training.labelled import LabelledSet, labelled_photos


def _jpeg(shade: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (shade, shade, shade)).save(buf, "JPEG")
    return buf.getvalue()


@pytest.fixture
def folders(tmp_path):
    pos, neg = tmp_path / "guns", tmp_path / "scenes"
    for folder, n in ((pos, 20), (neg / "street", 30), (neg / "kitchen", 20)):
        folder.mkdir(parents=True)
        for i in range(n):
            (folder / f"{folder.name}-{i:03d}.jpg").write_bytes(_jpeg(i))
    (neg / "notes.txt").write_text("not an image")
    return pos, neg


def test_folders_split_every_image_once_by_name_and_report_their_sources(folders):
    pos, neg = folders
    labelled = LabelledSet.from_folders([str(pos)], [str(neg)])
    assert len(labelled.uris) == 70 and sum(labelled.labels) == 20  # the .txt is not an image
    splits = {name: labelled.split(name) for name in ("train", "val", "test")}
    uris = [u for items in splits.values() for u, _ in items]
    assert sorted(uris) == sorted(labelled.uris)  # every image in exactly one split
    assert [len(splits[s]) for s in ("train", "val", "test")] == [42, 14, 14]
    assert LabelledSet.from_folders([str(pos)], [str(neg)]).split("test") == splits["test"]  # stable
    report = labelled.report()
    assert report["test"]["positives"] == 4 and report["test"]["negatives"] == 10
    assert report["train"]["sources"][f"{pos} (positive)"] == 12


def test_a_manifest_labels_images_anywhere(folders, tmp_path):
    pos, neg = folders
    uris = [str(p) for p in sorted(pos.iterdir())] + [str(p) for p in sorted((neg / "street").iterdir())]
    labels = [1] * 20 + [0] * 30
    pq.write_table(pa.table({"uri": uris, "label": labels}), tmp_path / "m.parquet")
    (tmp_path / "m.csv").write_text("uri,label\n" + "".join(f"{u},{y}\n" for u, y in zip(uris, labels)))
    for name in ("m.parquet", "m.csv"):
        labelled = LabelledSet.from_manifest(str(tmp_path / name))
        assert labelled.labels == tuple(labels) and len(labelled.split("val")) == 10


def test_bad_labelled_sets_are_refused_clearly(folders, tmp_path):
    pos, neg = folders
    with pytest.raises(ValueError, match="needs positives and negatives"):
        LabelledSet.from_folders([], [str(neg)])
    with pytest.raises(FileNotFoundError, match="no images"):
        LabelledSet.from_folders([str(tmp_path / "empty")], [str(neg)])
    (tmp_path / "bad.csv").write_text("path,label\nx.jpg,1\n")
    with pytest.raises(ValueError, match="lacks the column"):
        LabelledSet.from_manifest(str(tmp_path / "bad.csv"))
    (tmp_path / "bad2.csv").write_text("uri,label\nx.jpg,2\ny.jpg,0\n")
    with pytest.raises(ValueError, match="labels must be 0 or 1"):
        LabelledSet.from_manifest(str(tmp_path / "bad2.csv"))


def test_a_manifest_split_column_keeps_named_splits_and_hashes_the_rest(folders, tmp_path):
    pos, neg = folders
    uris = [str(p) for p in sorted(pos.iterdir())] + [str(p) for p in sorted((neg / "street").iterdir())]
    labels = [1] * 20 + [0] * 30
    named = ["test"] * 5 + [""] * 15 + ["train"] * 10 + [""] * 20
    (tmp_path / "m.csv").write_text("uri,label,split\n" + "".join(
        f"{u},{y},{s}\n" for u, y, s in zip(uris, labels, named)))
    labelled = LabelledSet.from_manifest(str(tmp_path / "m.csv"))
    splits = {name: {u for u, _ in labelled.split(name)} for name in ("train", "val", "test")}
    assert set(uris[:5]) <= splits["test"] and set(uris[20:30]) <= splits["train"]
    assert sorted(u for s in splits.values() for u in s) == sorted(uris)  # each once
    assert len(splits["test"] & set(uris[5:20])) == 3  # the unnamed 15 positives split 60/20/20
    (tmp_path / "bad.csv").write_text(f"uri,label,split\n{uris[0]},1,holdout\n{uris[25]},0,\n")
    with pytest.raises(ValueError, match="split must be one of"):
        LabelledSet.from_manifest(str(tmp_path / "bad.csv"))


# The split rule, written out again independently of ngt_ray: packaged checkpoints were trained and
# calibrated on these splits, and the demo's test photos must stay unseen, so it may never move.
def _sha1(name: str) -> str:
    return hashlib.sha1(name.encode()).hexdigest()


def _cut(members: list, split: str) -> list:
    lo, hi = {"train": (0.0, 0.6), "val": (0.6, 0.8), "test": (0.8, 1.0)}[split]
    return members[round(lo * len(members)):round(hi * len(members))]


def test_caltech_splits_follow_the_per_class_file_name_hash(caltech):
    """Per class folder, files sorted by the sha1 of their name, cut at 60 % and 80 %; revolver is 1."""
    classes = sorted(p for p in (caltech / "train").iterdir() if p.is_dir())
    expected = {split: [(f, int(c.name == "revolver")) for c in classes
                        for f in _cut(sorted(c.glob("*.jpg"), key=lambda f: _sha1(f.name)), split)]
                for split in ("train", "val", "test")}
    labelled = labelled_photos(Photos(data=caltech))
    for split, items in expected.items():
        assert labelled.split(split) == [(str(f), y) for f, y in items]
        assert caltech_split(caltech, split) == items
    assert [sum(y for _, y in expected[s]) for s in ("train", "val", "test")] == [33, 11, 11]
    assert sum(map(len, expected.values())) == len(labelled.uris) == len(list(caltech.glob("train/*/*.jpg")))
    assert labelled_photos(Photos()).split("test") == labelled.split("test")  # the shared default folder


def test_a_manifest_without_splits_is_split_per_label_by_file_name(folders, tmp_path):
    """Positives, then negatives, each sorted by the sha1 of the file name (equal names keep their
    order), cut at 60 % and 80 %; rows with a named split join it after the hashed ones."""
    pos, neg = folders
    rows = [(str(p), 1, "") for p in sorted(pos.iterdir())]
    rows += [(str(p), 0, "") for p in sorted((neg / "street").iterdir())]
    rows += [(str(tmp_path / "copy" / Path(u).name), 0, "") for u, _, _ in rows[:6]]  # the same names again
    rows += [(str(p), 0, "val") for p in sorted((neg / "kitchen").iterdir())[:5]]
    (tmp_path / "m.csv").write_text("uri,label,split\n" + "".join(f"{u},{y},{s}\n" for u, y, s in rows))
    labelled = labelled_photos(Photos(manifest=str(tmp_path / "m.csv")))
    for split in ("train", "val", "test"):
        expected = []
        for label in (1, 0):
            hashed = [u for u, y, s in rows if y == label and not s]
            expected += [(u, label) for u in _cut(sorted(hashed, key=lambda u: _sha1(Path(u).name)), split)]
            expected += [(u, label) for u, y, s in rows if y == label and s == split]
        assert labelled.split(split) == expected


def test_labelled_photos_reads_a_manifest_folders_or_caltech(folders, tmp_path):
    pos, neg = folders
    uris = [str(p) for p in sorted(pos.iterdir())] + [str(p) for p in sorted((neg / "street").iterdir())]
    (tmp_path / "m.csv").write_text("uri,label\n" + "".join(f"{u},{int('guns' in u)}\n" for u in uris))
    from_manifest = labelled_photos(Photos(manifest=str(tmp_path / "m.csv"), data=tmp_path / "unused"))
    assert from_manifest == LabelledSet.from_manifest(str(tmp_path / "m.csv"))
    assert from_manifest.name == str(tmp_path / "m.csv")
    from_folders = labelled_photos(Photos(positives=(str(pos),), negatives=(str(neg),)))
    assert from_folders == LabelledSet.from_folders([str(pos)], [str(neg)])
    assert from_folders.origin == {"positives": [str(pos)], "negatives": [str(neg)]}
    with pytest.raises(ValueError, match="not both"):
        labelled_photos(Photos(manifest=str(tmp_path / "m.csv"), positives=(str(pos),), negatives=(str(neg),)))
    # a Caltech-101 layout: one folder per class under train/, revolver the positive class
    for cls, n in (("revolver", 5), ("kangaroo", 10), ("pizza", 10)):
        (tmp_path / "caltech" / "train" / cls).mkdir(parents=True)
        for i in range(n):
            (tmp_path / "caltech" / "train" / cls / f"image_{i:04d}.jpg").write_bytes(_jpeg(i))
    caltech = labelled_photos(Photos(data=tmp_path / "caltech"))
    assert caltech.name == "caltech101" and sum(caltech.labels) == 5
    assert caltech.report()["test"] == {"positives": 1, "negatives": 4, "sources": {
        "caltech101/other (negative)": 4, "caltech101/revolver (positive)": 1}}
    with pytest.raises(FileNotFoundError, match="no Caltech-101 training folder"):
        labelled_photos(Photos(data=tmp_path / "nowhere"))
