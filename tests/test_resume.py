"""What an earlier attempt wrote is looked up per key range: the driver reads footers, a read task
loads only the flags files whose uri range holds its keys (``ngt_ray.job.resume``)."""

from __future__ import annotations

import os
import pickle
import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ngt_ray.job import resume
from ngt_ray.job.contracts import FLAGS_SCHEMA
from ngt_ray.job.resume import Finished
from ngt_ray.job.sources import _listing, _unwritten, list_entries
from ngt_ray.storage import resolve


def _flags(folder, name: str, uris: list[str]) -> None:
    """One flags file of ``uris`` (the other columns as an error row has them)."""
    n = len(uris)
    table = pa.table({"uri": uris, "flagged": [False] * n, "score": [None] * n, "group_id": [None] * n,
                      "group_size": [None] * n, "group_score": [None] * n, "decided_by": ["error"] * n,
                      "tests": [0.0] * n, "compute_macs": [0.0] * n, "compute_seconds": [None] * n,
                      "error": ["decode failed"] * n, "error_kind": ["decode"] * n}, schema=FLAGS_SCHEMA)
    pq.write_table(table, folder / name)


@pytest.fixture
def reads(monkeypatch) -> list[str]:
    """The flags files whose uris a lookup loaded (none cached between tests)."""
    loaded: list[str] = []
    real = resume.fetch

    def counting(fs, paths, **kwargs):
        if "ranges" not in kwargs:  # a whole file: its uris (footers are ranged reads)
            loaded.extend(os.path.basename(p) for p in paths)
        return real(fs, paths, **kwargs)

    monkeypatch.setattr(resume, "fetch", counting)
    monkeypatch.setattr(resume, "_cache", resume.OrderedDict())
    return loaded


def test_a_batch_loads_only_the_flags_files_whose_uri_range_holds_its_keys(tmp_path, reads):
    flags = tmp_path / "flags"
    flags.mkdir()
    uris = [f"s3://b/{i:06d}.jpg" for i in range(0, 10_000, 2)]  # the even ones are written, in input order
    for start in range(0, len(uris), 1000):  # five files of 1000 uris each, as an ordered run writes them
        _flags(flags, f"part-{start // 1000}.parquet", uris[start:start + 1000])
    _flags(flags, "empty.parquet", [])
    (flags / "cut.parquet").write_bytes(b"PAR1 and then the kill")  # no footer: removed, its rows redone

    done = Finished.of(resolve(str(flags)))
    assert len(done) == 5000 and done.files.num_rows == 5  # rows from the footers; the empty file counts none
    assert not (flags / "cut.parquet").exists()
    assert done.files["min"].to_pylist()[2] == uris[2000] and done.files["max"].to_pylist()[2] == uris[2999]

    batch = [f"s3://b/{i:06d}.jpg" for i in range(4100, 4356)]  # a block of 256 inside the third file
    assert done.written(batch).tolist() == [i % 2 == 0 for i in range(4100, 4356)]
    assert reads == ["part-2.parquet"]
    straddling = [f"s3://b/{i:06d}.jpg" for i in range(5990, 6010)]
    assert done.written(straddling).tolist() == [i % 2 == 0 for i in range(5990, 6010)]
    assert reads == ["part-2.parquet", "part-3.parquet"]  # the third file came from the cache
    assert not done.written(["s3://a/before.jpg", "s3://c/after.jpg", "s3://b/004001.jpg"]).any()
    assert reads == ["part-2.parquet", "part-3.parquet"]  # in a gap or outside every range: nothing read

    # the index travels to every read task: small, and it answers the same there
    again = pickle.loads(pickle.dumps(done))
    everything = [f"s3://b/{i:06d}.jpg" for i in range(-5, 10_005)]
    assert again.written(everything).tolist() == [u in set(uris) for u in everything]


def test_files_out_of_order_and_files_without_statistics_are_still_exact(tmp_path, reads):
    flags = tmp_path / "flags"
    flags.mkdir()
    rng = random.Random(0)
    universe = [f"file:///bucket/{rng.getrandbits(40):010x}.png" for _ in range(3000)]
    written = rng.sample(universe, 2000)  # an unsorted manifest's order: every file spans the key space
    for i in range(4):
        _flags(flags, f"part-{i}.parquet", written[i * 500:(i + 1) * 500])
    long_uri = "file:///bucket/" + "x" * 5000  # over the writer's statistics limit: a file of any uri
    _flags(flags, "long.parquet", [long_uri])
    done = Finished.of(resolve(str(flags)))
    assert done.files.filter(pa.compute.is_null(done.files["min"])).num_rows == 1
    got = done.written(universe + [long_uri, "file:///bucket/zzz"])
    assert got.tolist() == [u in set(written) for u in universe] + [True, False]
    assert len(done) == 2001


def test_no_flags_is_an_empty_index(tmp_path, reads):
    done = Finished.of(resolve(str(tmp_path / "flags")))
    assert not done and len(done) == 0 and not done.written(["s3://b/a.jpg"]).any()
    assert not Finished() and Finished().written([]).shape == (0,)
    assert reads == []


def test_read_tasks_drop_the_rows_already_written_by_uri_or_by_path(tmp_path, reads):
    bucket = tmp_path / "bucket"
    bucket.mkdir()
    names = ["a.jpg", "b#1.jpg", "c.jpg", "d.jpg"]
    for name in names:
        (bucket / name).write_bytes(b"x")
    loc = resolve(str(bucket))
    flags = tmp_path / "flags"
    flags.mkdir()
    _flags(flags, "part-0.parquet", [loc.object_uri(str(bucket / n)) for n in ("b#1.jpg", "d.jpg")])
    done = Finished.of(resolve(str(flags)))

    listed = _listing(loc)
    assert listed["path"].to_pylist() == [e.path for e in list_entries(loc)] == sorted(str(bucket / n) for n in names)
    kept = _unwritten(listed, done, loc)
    assert [os.path.basename(p) for p in kept["path"].to_pylist()] == ["a.jpg", "c.jpg"]
    assert kept.schema == listed.schema and kept["size"].to_pylist() == [1, 1]  # every column, types kept
    d = loc.object_uri(str(bucket / "d.jpg"))
    samples = pa.table({"uri": [f"{d}#k", d], "bytes": [b"1", b""]})
    assert _unwritten(samples, done)["uri"].to_pylist() == [f"{d}#k"]  # a sample is not its container


def test_the_listing_table_keeps_the_reasons_an_entry_is_not_read(tmp_path):
    bucket = tmp_path / "bucket"
    (bucket / "sub").mkdir(parents=True)
    (bucket / "sub" / "z.jpg").write_bytes(b"z" * 3)
    (bucket / "é.jpg").write_bytes(b"e")
    os.symlink(bucket / "missing.jpg", bucket / "dangling.jpg")
    os.mkfifo(bucket / "pipe")
    table = _listing(resolve(str(bucket)))
    entries = list_entries(resolve(str(bucket)))
    assert table["path"].to_pylist() == [e.path for e in entries]
    assert table["size"].to_pylist() == [e.size for e in entries]
    assert table["problem"].to_pylist() == [e.problem and e.problem.message for e in entries]
    assert table["problem_kind"].to_pylist() == [e.problem and e.problem.kind.value for e in entries]
    with pytest.raises(FileNotFoundError, match="no objects under"):
        _listing(resolve(str(tmp_path / "nothing")))


def _packed(planted, where, form: str) -> tuple[str, dict]:
    """The planted photos as two WebDataset shards, two Parquet files of image bytes, or a folder
    named by a manifest of its keys; the input URL and the run's options."""
    import io
    import tarfile

    files = sorted(planted.root.iterdir())
    where.mkdir()
    if form == "manifest":
        pq.write_table(pa.table({"key": [p.name for p in files]}), where / "keys.parquet")
        return str(planted.root), {"input_manifest": str(where / "keys.parquet")}
    for s in range(2):
        part = files[s::2]
        if form == "parquet":
            pq.write_table(pa.table({"key": [p.stem for p in part], "image": [p.read_bytes() for p in part]}),
                           where / f"part-{s}.parquet")
            continue
        with tarfile.open(where / f"shard-{s}.tar", "w") as tar:
            for p in part:
                info = tarfile.TarInfo(f"{p.stem}.jpg")
                info.size = p.stat().st_size
                tar.addfile(info, io.BytesIO(p.read_bytes()))
    return str(where), {}


@pytest.mark.parametrize("form", ["webdataset", "parquet", "manifest"])
def test_packed_and_manifest_inputs_resume_with_every_row_exactly_once(ray_local, planted, tmp_path, form):
    from ngt_ray.job.pipeline import ModerationConfig, run_moderation

    source, options = _packed(planted, tmp_path / "in", form)
    out = tmp_path / "out"
    cfg = ModerationConfig(input=source, output=str(out), stub_models=True, measure_time=False, batch_size=4,
                           rows_per_file=4, **options)
    first = run_moderation(cfg)
    every = sorted(pq.read_table(out / "flags", columns=["uri"]).column("uri").to_pylist())
    assert len(every) == len(set(every)) == first["images"] == planted.count
    # an interrupted run: the first rows in files of 4 (each is written whole), the rest absent, one cut short
    rows = pq.read_table(out / "flags").sort_by("uri")
    for f in (out / "flags").iterdir():
        f.unlink()
    kept = planted.count // 2 + 1
    for start in range(0, kept, 4):
        pq.write_table(rows.slice(start, min(4, kept - start)), out / "flags" / f"part-{start:03d}.parquet")
    (out / "flags" / "cut.parquet").write_bytes(b"PAR1 half a file")
    (out / "_SUCCESS").unlink()

    again = run_moderation(cfg)
    uris = sorted(pq.read_table(out / "flags", columns=["uri"]).column("uri").to_pylist())
    assert uris == every  # every sample (container#key) or object exactly once
    assert again["resumed_rows"] == kept and 0 < kept < planted.count
    assert again["images"] == planted.count and not (out / "flags" / "cut.parquet").exists()


def test_the_first_object_of_a_local_folder_is_found_without_listing_it_whole(tmp_path):
    from ngt_ray.job.sources import _first_object, detect_format

    bucket = tmp_path / "bucket"
    (bucket / "b" / "deeper").mkdir(parents=True)
    (bucket / "a").mkdir()
    for name in ("b/z.tar", "b/c.tar", "b/_meta.tar", "b/deeper/a.tar", "a/.hidden.tar", "a/x.parquet"):
        (bucket / name).write_bytes(b"x")
    loc = resolve(str(bucket))
    # folders top-down and in order of name; in a folder, the smallest visible name
    assert _first_object(loc) == str(bucket / "a" / "x.parquet") and detect_format(loc) == "parquet"
    assert _first_object(loc, ".tar") == str(bucket / "b" / "c.tar")
    (bucket / "top.jpg").write_bytes(b"x")
    assert _first_object(loc) == str(bucket / "top.jpg") and detect_format(loc) == "images"
    with pytest.raises(FileNotFoundError, match="no .png files under"):
        _first_object(loc, ".png")
