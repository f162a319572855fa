"""The input path: reduced-size decode, the on-device decoder and its CPU fallbacks, the no-grouping
baseline, and the side-by-side benchmark at tiny size."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from ngt_ray.job.pipeline import ModerationConfig, run_moderation
from ngt_ray.nets.decode import decode_image, decode_on_device
from ngt_ray.training.datasets import caltech_split

SIZE = 224


@pytest.fixture(scope="module")
def large_jpegs(caltech) -> list[bytes]:
    """Twelve held-out photos re-encoded at 1000 x 750, larger than any model input."""
    blobs = []
    for path, _ in caltech_split(caltech, "test")[::100][:12]:
        buf = io.BytesIO()
        Image.open(path).convert("RGB").resize((1000, 750), Image.Resampling.BICUBIC).save(buf, "JPEG", quality=90)
        blobs.append(buf.getvalue())
    return blobs


def _full_decode(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as img:
        rgb = img.convert("RGB").resize((SIZE, SIZE), Image.Resampling.BILINEAR)
    return np.asarray(rgb).transpose(2, 0, 1).astype(np.int16)


def test_reduced_size_decode_matches_full_decode_and_resize(large_jpegs):
    with Image.open(io.BytesIO(large_jpegs[0])) as img:
        img.draft("RGB", (SIZE, SIZE))
        assert img.size[0] < 1000  # the DCT-scaled decode really is smaller
    for data in large_jpegs:
        reduced, err = decode_image(data, SIZE)
        assert err is None and reduced.shape == (3, SIZE, SIZE) and reduced.dtype == np.uint8
        assert np.abs(reduced.astype(np.int16) - _full_decode(data)).mean() < 2.0


def test_device_decoder_without_cuda_matches_and_falls_back_per_image(large_jpegs):
    png = io.BytesIO()
    Image.open(io.BytesIO(large_jpegs[1])).save(png, "PNG")
    truncated = large_jpegs[2][: len(large_jpegs[2]) // 3]
    blobs = [*large_jpegs[:4], png.getvalue(), b"\xff\xd8\xffnot really a jpeg", b"", truncated]
    pixels, errors = decode_on_device(blobs, SIZE, torch.device("cpu"))
    assert pixels.shape == (len(blobs), 3, SIZE, SIZE) and pixels.dtype == torch.uint8
    for i, data in enumerate(large_jpegs[:4]):
        assert errors[i] is None
        assert np.abs(pixels[i].numpy().astype(np.int16) - _full_decode(data)).mean() < 1.0
    assert errors[4] is None  # PNG: decoded by the CPU fallback
    assert np.abs(pixels[4].numpy().astype(np.int16) - _full_decode(blobs[4])).mean() < 2.0
    assert errors[5] and errors[6].message == "empty object"
    assert errors[7] is None or "decode failed" in errors[7].message  # Pillow may salvage a truncated JPEG


@pytest.mark.usefixtures("ray_local")
def test_gpu_decode_falls_back_cleanly_without_cuda(planted, bucket_copy, tmp_path):
    bucket = bucket_copy
    (bucket / "zero-bytes.jpg").write_bytes(b"")
    (bucket / "text.png").write_bytes(b"this is not an image")
    stats = run_moderation(ModerationConfig(input=str(bucket), output=str(tmp_path / "out"), decode="gpu",
                                            measure_time=False))
    flags = pq.read_table(tmp_path / "out" / "flags").to_pylist()
    assert len(flags) == stats["images"] == planted.count + 2 and stats["decode"] == "gpu"
    errors = {Path(r["uri"]).name for r in flags if r["decided_by"] == "error"}
    assert errors == {"zero-bytes.jpg", "text.png"}
    found = {Path(r["uri"]).name for r in flags if r["flagged"]} & set(planted.positives)
    assert len(found) >= len(planted.positives) - 1


@pytest.mark.usefixtures("ray_local")
def test_individual_baseline_scores_every_image_once(planted, tmp_path):
    stats = run_moderation(ModerationConfig(input=str(planted.root), output=str(tmp_path / "out"),
                                            group_size="none", measure_time=False))
    flags = pq.read_table(tmp_path / "out" / "flags").to_pylist()
    assert len(flags) == planted.count and {r["decided_by"] for r in flags} == {"retest"}
    assert stats["group_tests"] == 0 and stats["retests"] == planted.count
    assert stats["compute_saving"] == pytest.approx(0.0, abs=1e-9)


@pytest.mark.usefixtures("ray_local")
def test_benchmark_runs_end_to_end_at_tiny_size(caltech, tmp_path):
    from ngt_ray.tools.benchmark import BenchmarkConfig, run_benchmark

    result = run_benchmark(BenchmarkConfig(data=caltech, workdir=tmp_path / "work", output=tmp_path / "json",
                                           markdown=tmp_path / "benchmarks.md", n_images=24, prevalence=0.05,
                                           device="cpu"))
    saved = json.loads((tmp_path / "json" / f"{result['device']}.json").read_text())
    for key in ("device", "n_images", "plain_images_per_s", "individual_images_per_s", "ngt_images_per_s"):
        assert saved[key] == result[key]
    assert saved["n_images"] == 24 and all(saved[k] > 0 for k in ("plain_images_per_s", "ngt_images_per_s"))
    for run in ("plain", "individual/flags", "ngt/flags"):
        assert pq.read_table(tmp_path / "work" / run).num_rows == 24
    assert saved["flags_agree_plain_individual"] >= 0.9  # same model, same threshold; resize paths differ
    assert saved["runs"]["individual"]["compute_saving"] == pytest.approx(0.0, abs=1e-9)
    assert "(c) ngt-ray, group testing" in (tmp_path / "benchmarks.md").read_text()
