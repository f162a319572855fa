"""``ngt-ray benchmark``: the plain Ray Data recipe, ngt-ray without grouping, and ngt-ray, side by side.

One run, one bucket of JPEGs at a realistic size, one backbone:

(a) **plain**: ``ray.data.read_images(size=...)`` -> an actor pool running the individual model on
    every image -> ``write_parquet``: what a user writes first;
(b) **individual**: ngt-ray's input path (bytes through the object store, draft-mode or on-device
    decode) with the individual model on every image (``--algorithm individual``);
(c) **ngt-ray**: the default job, group testing with the compressed screen.

The ratios (b)/(a) and (c)/(a) are what the benchmark is for; absolute figures depend on the
machine. Core-seconds and GPU-seconds are *reserved* resources (wall time x the cluster's CPUs or
GPUs), which is what a cluster is billed for. (a) and (b) run the same model at the same
threshold, so their flags should agree; disagreements come from the two resize paths and are
counted, not hidden.
"""

from __future__ import annotations

import io
import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import ray
import ray.data
import torch
from PIL import Image

from ngt_ray.checkpoint import DEFAULT_INDIVIDUAL_MODEL, load_checkpoint
from ngt_ray.datasets import caltech_split
from ngt_ray.pipeline import ModerationConfig, actor_resources, run_moderation
from ngt_ray.runtime import inference_context
from ngt_ray.stages import ModelActor

log = logging.getLogger(__name__)

__all__ = ["BenchmarkConfig", "make_jpeg_bucket", "run_benchmark", "write_markdown"]


@dataclass
class BenchmarkConfig:
    data: Path  # Caltech-101 folder: the photos the bucket is made of
    workdir: Path
    output: Path = Path("docs/benchmarks")  # <device>.json
    markdown: Path = Path("docs/benchmarks.md")
    input: str | None = None  # an existing folder of JPEGs instead of a generated bucket
    n_images: int = 2000
    prevalence: float = 0.001
    width: int = 500
    height: int = 375
    decode: str = "auto"
    runtime: str = "fast"
    device: str = "auto"
    seed: int = 0


def make_jpeg_bucket(data: Path, root: Path, n: int, prevalence: float, width: int, height: int,
                     seed: int = 0) -> tuple[Path, set[str]]:
    """``n`` JPEGs of ``width`` x ``height`` made from held-out Caltech photos, ``prevalence`` of them
    (at least one) revolvers. Photos are reused, mirrored on odd passes, when ``n`` exceeds the set.
    Returns the folder and the file names of the positives."""
    rng = np.random.default_rng(seed)
    items = caltech_split(data, "test")
    positives = [p for p, label in items if label == 1]
    negatives = [p for p, label in items if label == 0]
    n_pos = max(1, round(n * prevalence))
    chosen = [(positives[i % len(positives)], True) for i in range(n_pos)]
    chosen += [(negatives[i % len(negatives)], False) for i in range(n - n_pos)]
    order = rng.permutation(len(chosen))
    root.mkdir(parents=True, exist_ok=True)
    planted = set()
    for j, idx in enumerate(order):
        path, positive = chosen[idx]
        name = f"{j:08d}.jpg"
        with Image.open(path) as img:
            img = img.convert("RGB").resize((width, height), Image.Resampling.BICUBIC)
            if (idx // len(positives if positive else negatives)) % 2:
                img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            buf = io.BytesIO()
            img.save(buf, "JPEG", quality=90)
        (root / name).write_bytes(buf.getvalue())
        if positive:
            planted.add(name)
    return root, planted


class _PlainClassifier(ModelActor):
    """The plain recipe's model stage: decoded HWC arrays in, one score per image out. It loads the
    model as ngt-ray's actors do (same runtime levers), so only the input path differs."""

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        # NHWC permuted to NCHW is already channels-last in memory: no copy on either device
        x = torch.from_numpy(np.ascontiguousarray(batch["image"])).to(self.device).permute(0, 3, 1, 2)
        with inference_context(self.device):
            score = torch.sigmoid(self.model(x).float()).cpu().numpy()
        return {"uri": batch["path"], "score": score, "flagged": score >= self.card.threshold}


def _plain(bucket: str, out: Path, cfg: BenchmarkConfig, on_gpu: bool) -> None:
    """(a), with the resources ngt-ray gives its one model stage in (b), so only the input path differs."""
    size = load_checkpoint(DEFAULT_INDIVIDUAL_MODEL)[1].input_size
    resources, max_actors, threads = actor_resources("cuda" if on_gpu else "cpu", model_stages=1)
    ds = ray.data.read_images(bucket, size=(size, size), mode="RGB", include_paths=True)
    ds = ds.map_batches(_PlainClassifier, fn_constructor_kwargs={
        "model_path": str(DEFAULT_INDIVIDUAL_MODEL), "device": "cuda" if on_gpu else "cpu", "threads": threads,
        "runtime": cfg.runtime}, batch_size=256 if on_gpu else 32,
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=max_actors), batch_format="numpy", **resources)
    ds.write_parquet(str(out))


def _flags(folder: Path, uri_column: str = "uri") -> dict[str, bool]:
    table = pq.read_table(folder, columns=[uri_column, "flagged"]).to_pylist()
    return {Path(r[uri_column]).name: bool(r["flagged"]) for r in table}


def run_benchmark(cfg: BenchmarkConfig) -> dict[str, Any]:
    """Run (a), (b) and (c) on one bucket; write ``<output>/<device>.json`` and the markdown table."""
    if not ray.is_initialized():
        ray.init()
    resources = ray.cluster_resources()
    on_gpu = resources.get("GPU", 0) > 0 and cfg.device != "cpu"
    device_name = torch.cuda.get_device_name(0).replace(" ", "-").lower() if on_gpu and torch.cuda.is_available() \
        else f"cpu-{int(resources.get('CPU', 1))}-cores"
    positives: set[str] = set()
    if cfg.input:
        bucket = cfg.input
    else:
        root, positives = make_jpeg_bucket(cfg.data, cfg.workdir / "bucket", cfg.n_images, cfg.prevalence,
                                           cfg.width, cfg.height, cfg.seed)
        bucket = str(root)
    n_images = sum(1 for _ in Path(bucket).glob("*.jpg")) if not bucket.startswith(("s3://", "gs://")) \
        else cfg.n_images
    cpus, gpus = resources.get("CPU", 0), resources.get("GPU", 0) if on_gpu else 0
    runs: dict[str, dict[str, Any]] = {}

    def timed(name: str, fn) -> None:
        start = time.perf_counter()
        stats = fn()
        wall = time.perf_counter() - start
        runs[name] = {"wall_seconds": wall, "images_per_s": n_images / wall,
                      "cpu_core_seconds_per_million": wall * cpus / n_images * 1e6,
                      "gpu_seconds_per_million": wall * gpus / n_images * 1e6, **(stats or {})}
        log.info("%s: %.1f images/s", name, n_images / wall)

    common = {"device": "cuda" if on_gpu else "cpu", "runtime": cfg.runtime, "decode": cfg.decode,
              "measure_time": False, "seed": cfg.seed}
    timed("plain", lambda: _plain(bucket, cfg.workdir / "plain", cfg, on_gpu))
    timed("individual", lambda: _compact(run_moderation(ModerationConfig(
        input=bucket, output=str(cfg.workdir / "individual"), algorithm="individual", **common))))
    timed("ngt", lambda: _compact(run_moderation(ModerationConfig(
        input=bucket, output=str(cfg.workdir / "ngt"), **common))))

    plain = _flags(cfg.workdir / "plain")
    individual, ngt = (_flags(cfg.workdir / name / "flags") for name in ("individual", "ngt"))
    agree = sum(plain[name] == individual.get(name) for name in plain)
    result = {
        "device": device_name, "n_images": n_images, "prevalence": cfg.prevalence,
        "image_size": f"{cfg.width}x{cfg.height}" if not cfg.input else "as given",
        "plain_images_per_s": runs["plain"]["images_per_s"],
        "individual_images_per_s": runs["individual"]["images_per_s"],
        "ngt_images_per_s": runs["ngt"]["images_per_s"],
        "individual_over_plain": runs["individual"]["images_per_s"] / runs["plain"]["images_per_s"],
        "ngt_over_plain": runs["ngt"]["images_per_s"] / runs["plain"]["images_per_s"],
        "flags_agree_plain_individual": agree / max(len(plain), 1),
        "flagged": {"plain": sum(plain.values()), "individual": sum(individual.values()), "ngt": sum(ngt.values())},
        "planted_positives": len(positives),
        "planted_found": {name: sum(flags.get(p, False) for p in positives)
                          for name, flags in (("plain", plain), ("individual", individual), ("ngt", ngt))},
        "runs": runs, "cluster": {"cpus": cpus, "gpus": gpus},
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(cfg).items()},
    }
    cfg.output.mkdir(parents=True, exist_ok=True)
    (cfg.output / f"{device_name}.json").write_text(json.dumps(result, indent=2) + "\n")
    write_markdown(cfg.output, cfg.markdown)
    print(_table(result))
    return result


def _compact(stats: dict) -> dict:
    return {k: stats[k] for k in ("images", "errors", "flagged", "compute_saving", "decode", "runtime",
                                  "mean_group_size", "group_tests", "retests") if k in stats}


def _table(r: dict[str, Any]) -> str:
    rows = [f"### {r['device']}: {r['n_images']} JPEGs ({r['image_size']}), prevalence {r['prevalence']}", "",
            "| pipeline | images/s | vs plain | core-s / M images | GPU-s / M images | flagged | compute_saving |",
            "|---|---|---|---|---|---|---|"]
    for name, label in (("plain", "(a) plain Ray Data recipe"), ("individual", "(b) ngt-ray, no grouping"),
                        ("ngt", "(c) ngt-ray, group testing")):
        run = r["runs"][name]
        rows.append(f"| {label} | {run['images_per_s']:.1f} | {run['images_per_s'] / r['plain_images_per_s']:.2f}x | "
                    f"{run['cpu_core_seconds_per_million']:.3g} | {run['gpu_seconds_per_million']:.3g} | "
                    f"{r['flagged'][name]} | {run.get('compute_saving', 0.0):.3f} |")
    rows += ["", (f"Flags of (a) and (b) agree on {r['flags_agree_plain_individual']:.2%} of images; planted "
             f"positives found: {r['planted_found']} of {r['planted_positives']}."), ""]
    return "\n".join(rows)


def write_markdown(folder: Path, markdown: Path) -> None:
    """``docs/benchmarks.md``: one table per device JSON in ``folder``."""
    parts = ["# Benchmarks", "", ("Written by `ngt-ray benchmark` (`jobs/benchmark.py`); one section per device, "
             "each from one run over one bucket. Core-seconds and GPU-seconds are reserved resources "
             "(wall time x the cluster's CPUs or GPUs)."), ""]
    for path in sorted(Path(folder).glob("*.json")):
        parts.append(_table(json.loads(path.read_text())))
    markdown.write_text("\n".join(parts))
