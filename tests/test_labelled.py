"""A user's labelled images from folders or a manifest, split once and for all."""

from __future__ import annotations

import io

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from ngt_ray.training.labelled import LabelledSet


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
