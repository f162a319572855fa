"""Bounded memory for any image: a bucket of large photos stays within each decode task's budget,
and the images that cost most to decode stay within the bound the decoder documents.

A decode task's budget (``stages.decode_budget``) is its peak private memory, what Ray Data
samples as the task's USS, by construction; its ``memory=`` reservation is the budget and the
quarter more Ray Data asks for, so a task within budget never draws Ray's "used X against a Y
reservation" warning.
"""

from __future__ import annotations

import io
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from ngt_ray.job.pipeline import ModerationConfig, run_moderation
from ngt_ray.job.stages import decode_budget, decode_memory
from ngt_ray.nets.decode import MAX_DECODE_BYTES, MAX_PIXELS

MiB = 2**20
LARGE = (8000, 6000)  # 48 Mpx, a high-end camera's photo
COPIES = 50


def _large_jpeg(caltech: Path) -> bytes:
    """A real photo blown up to 8000x6000 and encoded once (~2 s); the bucket holds copies of it."""
    photo = next((caltech / "train" / "revolver").glob("*.jpg"))
    buf = io.BytesIO()
    Image.open(photo).convert("RGB").resize(LARGE, Image.Resampling.BILINEAR).save(buf, "JPEG", quality=90)
    return buf.getvalue()


@pytest.fixture(scope="module")
def large_bucket(caltech, tmp_path_factory) -> Path:
    """50 copies of one 8000x6000 JPEG under different names: what the decoder does with each is
    the same, and 50 distinct encodes would take a minute on two cores without telling more."""
    root = tmp_path_factory.mktemp("large") / "bucket"
    root.mkdir()
    data = _large_jpeg(caltech)
    for i in range(COPIES):
        (root / f"camera-{i:02d}.jpg").write_bytes(data)
    return root


def _peak_memory_detector():
    """A Ray Data issue detector that keeps, at the end of a run, each operator's peak task USS as
    Ray Data measured it (the figure its high-memory warning is about)."""
    from ray.data._internal.execution.operators.map_operator import MapOperator
    from ray.data._internal.issue_detection.issue_detector import IssueDetector

    class PeakMemory(IssueDetector):
        peaks: dict[str, int] = {}

        def __init__(self, operators: list) -> None:
            self.operators = operators

        @classmethod
        def from_executor(cls, executor) -> PeakMemory:
            return cls(list(executor._topology or {}))

        def detect_periodic(self) -> list:
            return []

        def detect_final(self) -> list:
            for op in self.operators:
                if isinstance(op, MapOperator) and op.metrics.max_uss_bytes.num_samples:
                    PeakMemory.peaks[op.name] = int(op.metrics.max_uss_bytes.max)
            return []

        def detection_time_interval_s(self) -> float:
            return 3600.0

    return PeakMemory


@pytest.mark.usefixtures("ray_local")
def test_a_bucket_of_large_photos_stays_within_the_decode_budget(large_bucket, tmp_path, caplog):
    import ray.data

    ctx = ray.data.DataContext.get_current()
    detector = _peak_memory_detector()
    saved = (ctx.memory_usage_poll_interval_s, list(ctx.issue_detectors_config.detectors))
    ctx.memory_usage_poll_interval_s = 0.01  # Ray samples each task's USS every second by default
    ctx.issue_detectors_config.detectors = [*saved[1], detector]
    try:
        with caplog.at_level(logging.WARNING, logger="ray.data"):
            stats = run_moderation(ModerationConfig(input=str(large_bucket), output=str(tmp_path / "out"),
                                                    stub_models=True, measure_time=False, decode="cpu"))
    finally:
        ctx.memory_usage_poll_interval_s, ctx.issue_detectors_config.detectors = saved
    flags = pq.read_table(tmp_path / "out" / "flags").to_pylist()
    assert len(flags) == stats["objects"] == stats["images"] == COPIES and stats["errors"] == 0
    decode = {name: peak for name, peak in detector.peaks.items() if "decode_batch" in name}
    assert decode, f"Ray Data measured no decode task: {detector.peaks}"
    peak = max(decode.values())
    rows, size = stats["batch_size"], stats["screen_input_size"]
    budget = decode_budget(rows, size)
    print(f"decode task peak USS {peak / MiB:.0f} MiB; budget {budget / MiB:.0f} MiB, reservation "
          f"{decode_memory(rows, size) / MiB:.0f} MiB ({rows} rows at {size} px); every operator: "
          + ", ".join(f"{name} {value / MiB:.0f} MiB" for name, value in detector.peaks.items()))
    assert peak <= budget, f"a decode task peaked at {peak / MiB:.0f} MiB, over its {budget / MiB:.0f} MiB budget"
    warned = [r.getMessage() for r in caplog.records if "decode_batch" in r.getMessage() and "memory" in r.getMessage()]
    assert not warned, warned


_MEASURE = """
import sys, threading, time
def private():  # what Ray Data calls USS: resident memory not shared with other processes
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("RssAnon"))
from ngt_ray.nets.decode import decode_image
data = open(sys.argv[1], "rb").read()
peak, done = [0], threading.Event()
def poll():
    while not done.is_set():
        peak[0] = max(peak[0], private())
        time.sleep(0.001)
before = private()
thread = threading.Thread(target=poll, daemon=True)
thread.start()
pixels, error = decode_image(data, 224)
done.set()
thread.join()
print(peak[0] - before, error)
"""


def _decode_memory(path: Path) -> tuple[int, str]:
    """Extra private memory one decode of the file at ``path`` takes, in a fresh interpreter."""
    out = subprocess.run([sys.executable, "-c", _MEASURE, str(path)], check=True, capture_output=True, text=True)
    extra, error = out.stdout.split(maxsplit=1)
    return int(extra), error.strip()


def test_the_costliest_images_decode_within_the_documented_bound(tmp_path):
    """At the pixel limit, a progressive 4:4:4 JPEG (libjpeg keeps every coefficient) and a PNG with
    alpha (decoded at 4 bytes a pixel, converted a strip at a time) stay within ``MAX_DECODE_BYTES``;
    a large baseline JPEG, decoded at reduced size by the DCT, takes a few MiB; an image one pixel
    over the limit is refused from its header, before any pixel."""
    side = int(MAX_PIXELS**0.5)
    ramp = np.tile(np.linspace(0, 255, side, dtype=np.float32).astype(np.uint8), (side, 1))
    rgba = Image.fromarray(np.dstack([ramp, ramp.T, ramp, np.full((side, side), 128, np.uint8)]))
    rgba.save(tmp_path / "alpha.png", compress_level=1)
    rgb = rgba.convert("RGB")
    del rgba
    rgb.save(tmp_path / "progressive.jpg", quality=90, progressive=True, subsampling=0)
    rgb.resize(LARGE).save(tmp_path / "camera.jpg", quality=90)
    del rgb
    for name, bound in [("progressive.jpg", MAX_DECODE_BYTES), ("alpha.png", MAX_DECODE_BYTES),
                        ("camera.jpg", 24 * MiB)]:
        extra, error = _decode_memory(tmp_path / name)
        print(f"{name}: {extra / MiB:.0f} MiB for one decode (bound {bound / MiB:.0f} MiB)")
        assert error == "None" and extra <= bound, (name, extra / MiB)
    Image.new("L", (side + 1, side + 1)).save(tmp_path / "over.png")
    extra, error = _decode_memory(tmp_path / "over.png")
    assert error.startswith("too large: image is") and extra <= 8 * MiB
