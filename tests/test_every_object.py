"""Exactly one row per object, by construction: the issue's 28-object bucket of odd and bad inputs.

Every entry the job's listing finds ends as one row: a score, or an error with a reason a person
can read and a kind the stats count. Names starting with ``.`` or ``_``, nested folders, symlinks,
FIFOs, unicode and ``#`` in names, decompression bombs and oversized objects included.
"""

from __future__ import annotations

import io
import os
import re
import struct
import zlib
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from ngt_ray.errors import ErrorKind, RowError
from ngt_ray.job.contracts import error_columns, errors_of
from ngt_ray.job.pipeline import ModerationConfig, run_moderation
from ngt_ray.job.sources import _read_listed, list_entries
from ngt_ray.nets.decode import decode_image
from ngt_ray.storage import MAX_OBJECT_BYTES, object_too_large, redact, resolve

# name -> None where the object is scored, else (kind, the start of its error message)
EXPECTED: dict[str, tuple[str, str] | None] = {
    "good-1.jpg": None,
    "good-2.jpg": None,
    "good-3.jpg": None,
    "link-to-good.jpg": None,  # a symlink to a file is read through the link, and named by the link
    ".hidden.jpg": None,
    "_underscore.jpg": None,
    "nested/deeper/photo.jpg": None,
    ".hidden-folder/photo.jpg": None,
    "_underscore-folder/photo.jpg": None,
    "alpha.png": None,
    "sixteen-bit.png": None,
    "grey.jpg": None,
    "cmyk.jpg": None,
    "animated.gif": None,
    "photo.webp": None,
    "photo.bmp": None,
    "фото-写真-é.jpg": None,
    "hash#frag.jpg": None,
    "100%.jpg": None,
    "dangling.jpg": ("not_a_file", "symlink target missing"),
    "folder-link": ("not_a_file", "not a regular file: a symlink to a folder"),
    "fifo.jpg": ("not_a_file", "not a regular file: a FIFO"),
    "truncated.jpg": ("decode", "decode failed: the image is truncated"),
    "empty.jpg": ("decode", "empty object"),
    "text.jpg": ("decode", "decode failed: not an image Pillow can read"),
    "bomb-header.png": ("too_large", "too large: image is 30000x30000 (900 Mpx), over the 64 Mpx limit"),
    "bomb-small-file.png": ("too_large", "too large: image is 11000x11000 (121 Mpx), over the 64 Mpx limit"),
    "huge-object.jpg": ("too_large", "too large: object is 65 MiB, over the 64 MiB limit"),
}


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares ``width`` x ``height`` and holds no pixels."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))


def _encoded(img: Image.Image, fmt: str, **options) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **options)
    return buf.getvalue()


def build_bad_bucket(photos: list[Path], root: Path) -> Path:
    """The 28 objects of ``EXPECTED`` under ``root``, made from real photos where they are images."""
    root.mkdir(parents=True)
    photo = [p.read_bytes() for p in photos[:9]]
    rgb = Image.open(io.BytesIO(photo[0])).convert("RGB")

    def put(name: str, data: bytes) -> None:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)

    for i, name in enumerate(["good-1.jpg", "good-2.jpg", "good-3.jpg", ".hidden.jpg", "_underscore.jpg",
                              "nested/deeper/photo.jpg", ".hidden-folder/photo.jpg",
                              "_underscore-folder/photo.jpg", "фото-写真-é.jpg"]):
        put(name, photo[i])
    put("hash#frag.jpg", photo[1])
    put("100%.jpg", photo[2])
    os.symlink("good-1.jpg", root / "link-to-good.jpg")
    os.symlink("missing.jpg", root / "dangling.jpg")
    os.symlink("nested", root / "folder-link")
    os.mkfifo(root / "fifo.jpg")
    put("alpha.png", _encoded(rgb.convert("RGBA"), "PNG"))
    grey = np.asarray(rgb.convert("L"), dtype=np.uint16) * 257
    put("sixteen-bit.png", _encoded(Image.fromarray(grey), "PNG"))
    put("grey.jpg", _encoded(rgb.convert("L"), "JPEG"))
    put("cmyk.jpg", _encoded(rgb.convert("CMYK"), "JPEG"))
    put("animated.gif", _encoded(rgb.convert("P"), "GIF", save_all=True,
                                 append_images=[rgb.rotate(90).convert("P")]))
    put("photo.webp", _encoded(rgb, "WEBP"))
    put("photo.bmp", _encoded(rgb, "BMP"))
    put("truncated.jpg", photo[3][: len(photo[3]) // 2])
    put("empty.jpg", b"")
    put("text.jpg", b"this is a text file that calls itself a JPEG\n")
    put("bomb-header.png", _png_header_only(30000, 30000))
    put("bomb-small-file.png", _encoded(Image.new("L", (11000, 11000)), "PNG"))  # ~120 KB, 121 Mpx
    with open(root / "huge-object.jpg", "wb") as f:  # sparse: the listing's size, no disk
        f.truncate(MAX_OBJECT_BYTES + 2**20)
    return root


@pytest.fixture
def bad_bucket(planted, tmp_path) -> Path:
    return build_bad_bucket(sorted(planted.root.iterdir()), tmp_path / "bucket")


def test_the_listing_finds_every_entry_and_says_what_it_is(tmp_path):
    """No Ray, no photos: names and folders starting with ``.`` or ``_`` are listed, symlinks to
    folders are not followed (a loop would never end), and each entry that cannot be read says why."""
    root = tmp_path / "b"
    (root / ".dot").mkdir(parents=True)
    (root / "_under").mkdir()
    for name in (".dot/a.jpg", "_under/b.jpg", ".c.jpg", "_d.jpg", "e.jpg"):
        (root / name).write_bytes(b"x")
    os.symlink("..", root / "loop")
    os.symlink("e.jpg", root / "link.jpg")
    os.symlink("nowhere", root / "dangling")
    os.mkfifo(root / "fifo")
    loc = resolve(str(root))
    entries = {Path(e.path).relative_to(root).as_posix(): e for e in list_entries(loc)}
    assert set(entries) == {".dot/a.jpg", "_under/b.jpg", ".c.jpg", "_d.jpg", "e.jpg", "loop", "link.jpg",
                            "dangling", "fifo"}
    assert entries["link.jpg"].problem is None and entries["link.jpg"].size == 1
    assert entries["dangling"].problem == RowError(ErrorKind.NOT_A_FILE, "symlink target missing")
    assert entries["loop"].problem.message.startswith("not a regular file: a symlink to a folder")
    assert entries["fifo"].problem == RowError(ErrorKind.NOT_A_FILE, "not a regular file: a FIFO")
    # a manifest's paths are looked at before they are read: a FIFO never blocks the reader
    rows = _read_listed({"path": np.array([str(root / "fifo"), str(root / "e.jpg")], dtype=object)}, loc)
    assert list(rows["error"]) == ["not a regular file: a FIFO", ""] and list(rows["bytes"]) == [b"", b"x"]


def test_uris_are_unambiguous_and_invert(tmp_path):
    loc = resolve(str(tmp_path))
    for name in ("hash#frag.jpg", "100%.jpg", "what?.jpg", "фото.jpg", "plain.jpg"):
        path = f"{loc.path}/{name}"
        uri = loc.object_uri(path)
        assert "#" not in uri and "?" not in uri and loc.object_path(uri) == path
        assert loc.object_path(f"{uri}#key-in-a-shard") == path
    assert loc.object_uri(f"{loc.path}/hash#frag.jpg").endswith("/hash%23frag.jpg")
    assert loc.object_uri(f"{loc.path}/фото.jpg").endswith("/фото.jpg")  # readable where nothing is ambiguous


def test_messages_carry_no_address_signature_or_key():
    assert redact("cannot identify image file <_io.BytesIO object at 0x7fca2b3c4d50>") == "cannot identify image file"
    signed = "read failed: https://b.s3.amazonaws.com/k.jpg?X-Amz-Credential=AKIA%2F&X-Amz-Signature=0f9e reset"
    assert "AKIA" not in redact(signed) and "0f9e" not in redact(signed) and "k.jpg" in redact(signed)
    assert redact("denied (X-Amz-Security-Token=IQoJb3Jp)") == "denied (X-Amz-Security-Token=<redacted>)"



def test_an_error_kind_is_decided_where_the_failure_is_met_not_read_from_its_wording():
    assert decode_image(b"", 64)[1].kind == decode_image(b"plain text", 64)[1].kind == ErrorKind.DECODE
    assert object_too_large(2**30).kind == ErrorKind.TOO_LARGE and object_too_large(10) is None
    retest = RowError(ErrorKind.READ, "reworded").prefixed("retest ")
    assert retest == RowError(ErrorKind.READ, "retest reworded")
    columns = error_columns([None, retest])  # as they travel between stages, and back
    assert errors_of(columns["error"], columns["error_kind"]) == [None, retest]


@pytest.mark.usefixtures("ray_local")
def test_every_object_of_the_bad_bucket_gives_exactly_one_row(bad_bucket, tmp_path):
    loc = resolve(str(bad_bucket))
    assert len(EXPECTED) == 28 and len(list_entries(loc)) == 28
    cfg = ModerationConfig(input=str(bad_bucket), output=str(tmp_path / "out"), stub_models=True, measure_time=False)
    stats = run_moderation(cfg)
    rows = pq.read_table(tmp_path / "out" / "flags").to_pylist()
    uris = [r["uri"] for r in rows]
    assert len(rows) == 28 and len(set(uris)) == 28
    expected_uris = {loc.object_uri(str(bad_bucket / name)): name for name in EXPECTED}
    assert set(uris) == set(expected_uris)
    assert not any("#" in u for u in uris)  # no object of a folder looks like a packed input's container#key
    for row in rows:
        name, want = expected_uris[row["uri"]], EXPECTED[expected_uris[row["uri"]]]
        if want is None:
            assert row["error"] is None and row["error_kind"] is None, (name, row["error"])
            assert row["decided_by"] != "error" and row["score"] is not None, name
        else:
            kind, message = want
            assert row["decided_by"] == "error" and row["flagged"] is False and row["score"] is None, name
            assert row["error_kind"] == kind and row["error"].startswith(message), (name, row["error"])
            assert not re.search(r"\b0x[0-9a-f]{6,}|<", row["error"]), row["error"]  # no repr, no address
    errors = {kind: sum(want is not None and want[0] == kind for want in EXPECTED.values()) for kind in ErrorKind}
    assert stats["objects"] == stats["images"] == len(rows) == 28 and stats["objects_from"] == "listing"
    assert {kind: stats[f"errors_{kind}"] for kind in ErrorKind} == errors
    scored = sum(r["error"] is None for r in rows)
    assert stats["objects"] == scored + sum(stats[f"errors_{kind}"] for kind in ErrorKind)
    assert stats["errors"] == sum(errors.values()) == 9

    # the uris are a function of the paths: a second run finds every object written, reads none again
    again = run_moderation(cfg)
    assert again["resumed_rows"] == again["objects"] == again["images"] == 28
    assert pq.read_table(tmp_path / "out" / "flags").num_rows == 28
