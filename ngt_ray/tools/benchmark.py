"""``ngt-ray benchmark``: the plain Ray Data recipe, ngt-ray without grouping, and ngt-ray, side by side.

One run, one bucket of JPEGs at a realistic size, one backbone:

(a) **plain**: ``ray.data.read_images(size=...)`` -> an actor pool running the individual model on
    every image -> ``write_parquet``: what a user writes first;
(b) **individual**: ngt-ray's input path (bytes through the object store, draft-mode or on-device
    decode) with the individual model on every image (``--group-size none``);
(c) **ngt-ray**: group testing with the compressed screen;
(d) **cascade**: the cascade design (the whole network per image at a low resolution, then the
    individual model on what passes), confirmed by its own individual model.

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
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import ray
import torch
from PIL import Image

from ngt_ray.grouptesting.buckets import plant
from ngt_ray.job.phases import OPERATOR_STAGES, operator_cpu_seconds
from ngt_ray.job.placement import cluster_nodes
from ngt_ray.job.plan import DECODERS, ModerationConfig, OnCluster, actor_placement
from ngt_ray.job.stages import ModelActor
from ngt_ray.nets.checkpoint import get_model, load_checkpoint, read_card
from ngt_ray.nets.runtime import RUNTIMES, inference_context
from ngt_ray.options import Photos, option
from ngt_ray.training.labelled import LabelledSet, labelled_photos, read_image_bytes, without_placeholders

log = logging.getLogger(__name__)

__all__ = ["BenchmarkConfig", "make_jpeg_bucket", "run_benchmark", "write_markdown"]


@dataclass(frozen=True, kw_only=True)
class BenchmarkConfig(OnCluster, Photos):
    """One benchmark run: the bucket, the pipelines' shared settings, where results go."""

    workdir: Path | None = option(None, "scratch folder for the bucket and the three outputs (default: a new "
                                        "temporary folder)")
    output: Path = option(Path("docs/benchmarks"), "folder for <device>.json")
    markdown: Path = option(Path("docs/benchmarks.md"), "the table of every device JSON in --output")
    input: str | None = option(None, "a folder of JPEGs to use instead of a generated bucket")
    n_images: int = option(2000, "JPEGs in the generated bucket, made from held-out photos")
    prevalence: float = option(0.001, "share of planted positives in the generated bucket")
    width: int = option(500, "width of the generated JPEGs")
    height: int = option(375, "height of the generated JPEGs")
    decode: str = option("auto", "decode placement of (b) and (c) (see moderate --decode)", choices=DECODERS)
    runtime: str = option("fast", "runtime levers of every model", choices=RUNTIMES)
    stub_models: bool = option(False, "near-zero-compute stand-ins for every model: the CPU cost of everything "
                                      "else, per stage")
    actors_per_gpu: int = option(2, "model actors sharing each GPU, in every pipeline")
    workers: int | None = option(None, "processes that build the bucket (default: all cores)")
    compare_decode: bool = option(False, "also run (c) with --decode cpu, to place decode by measurement")
    # The generated bucket plants Caltech revolvers unless --manifest or --positives name other
    # photos, so the revolver pair is the default; for another class (or an --input bucket of it)
    # name the pair that class uses.
    model: str = option("revolver-lite0-tree-k8-compressed", "screen of (c) (a checkpoint stem or packaged name)")
    individual_model: str = option("revolver-lite0-individual", "model of (a) and (b), and the confirmation of (c)")
    cascade_model: str | None = option("firearm-lite0-cascade-k1", "screen of (d), confirmed by the individual model "
                                                                   "its card names (none: no (d))")


def _write_jpeg(job: tuple[Path | str, Path, bool, int, int, str | None]) -> None:
    src, dest, mirror, width, height, s3_endpoint = job
    with Image.open(io.BytesIO(read_image_bytes(src, s3_endpoint))) as img:
        img = img.convert("RGB").resize((width, height), Image.Resampling.BICUBIC)
        if mirror:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        img.save(dest, "JPEG", quality=90)


def make_jpeg_bucket(photos: LabelledSet, root: Path, n: int, prevalence: float, width: int, height: int,
                     seed: int = 0, workers: int | None = None,
                     s3_endpoint: str | None = None) -> tuple[Path, set[str]]:
    """``n`` JPEGs of ``width`` x ``height`` made from the held-out (``test``) photos of ``photos``,
    ``prevalence`` of them (at least one) positives, written by ``workers`` processes. Photos are
    reused, mirrored on odd passes, when ``n`` exceeds the set; empty files (placeholders that keep
    the hash split of a partial copy intact) are skipped. Returns the folder and the file names of
    the positives."""
    rng = np.random.default_rng(seed)
    items = without_placeholders(photos.split("test"), s3_endpoint)
    labels = np.array([label for _, label in items])
    pos_idx, neg_idx = plant(labels, prevalence, rng, total=n)
    chosen = [(items[i][0], True) for i in pos_idx] + [(items[i][0], False) for i in neg_idx]
    positives, negatives = (labels == 1).sum(), (labels == 0).sum()
    order = rng.permutation(len(chosen))
    root.mkdir(parents=True, exist_ok=True)
    jobs, planted = [], set()
    for j, idx in enumerate(order):
        path, positive = chosen[idx]
        name = f"{j:08d}.jpg"
        mirror = bool((idx // (positives if positive else negatives)) % 2)
        jobs.append((path, root / name, mirror, width, height, s3_endpoint))
        if positive:
            planted.add(name)
    with ProcessPoolExecutor(workers or os.cpu_count()) as pool:
        list(pool.map(_write_jpeg, jobs, chunksize=64))
    return root, planted


class _PlainClassifier(ModelActor):
    """The plain recipe's model stage: decoded HWC arrays in, one score per image out. It loads the
    model as ngt-ray's actors do (same runtime levers), so only the input path differs."""

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        x = self._to_device(batch["image"])  # NHWC, as ngt-ray's own decode hands it over
        with inference_context(self.device):
            score = torch.sigmoid(self.model(x).float()).cpu().numpy()
        return {"uri": batch["path"], "score": score, "flagged": score >= self.card.threshold}


def _plain(bucket: str, out: Path, cfg: BenchmarkConfig, on_gpu: bool) -> dict[str, float]:
    """(a), with the resources ngt-ray gives its model actors in (b), so only the input path differs."""
    import ray.data  # here: importing Ray Data costs every other verb a second

    size = load_checkpoint(get_model(cfg.individual_model))[1].input_size
    placement = actor_placement(cluster_nodes(), "cuda" if on_gpu else "cpu",
                                actors_per_gpu=cfg.actors_per_gpu)
    ds = ray.data.read_images(bucket, size=(size, size), mode="RGB", include_paths=True)
    ds = ds.map_batches(_PlainClassifier, fn_constructor_kwargs={
        "model_path": str(get_model(cfg.individual_model)), "device": "cuda" if on_gpu else "cpu",
        "threads": placement.threads, "runtime": cfg.runtime, "stub": cfg.stub_models},
        batch_size=512 if on_gpu else 32, compute=ray.data.ActorPoolStrategy(min_size=1, max_size=placement.pool_max),
        batch_format="numpy", **placement.resources)
    ds.write_parquet(str(out))
    ops = operator_cpu_seconds(ds)
    return {f"cpu_seconds_op_{stage}": ops[stage] for stage in OPERATOR_STAGES}


class _GpuSampler:
    """Samples GPU utilisation with nvidia-smi while a pipeline runs (none without nvidia-smi):
    the share of time a kernel was running, measured outside the job."""

    def __enter__(self) -> _GpuSampler:
        self.samples: list[float] = []
        exe = shutil.which("nvidia-smi")
        self.proc = subprocess.Popen([exe, "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits",
                                      "-lms", "200"], stdout=subprocess.PIPE, text=True) if exe else None
        return self

    def __exit__(self, *exc) -> None:
        if self.proc is not None:
            self.proc.terminate()
            out, _ = self.proc.communicate(timeout=10)
            self.samples = [float(v) for v in out.split() if v.replace(".", "", 1).isdigit()]

    @property
    def mean(self) -> float | None:
        return sum(self.samples) / len(self.samples) / 100 if self.samples else None


def _flags(folder: Path, uri_column: str = "uri") -> dict[str, bool]:
    table = pq.read_table(folder, columns=[uri_column, "flagged"]).to_pylist()
    return {Path(r[uri_column]).name: bool(r["flagged"]) for r in table}


# per-image non-model CPU budgets (microseconds) that let a 16-core node feed 10,000 images/s
BUDGET_US = {"with_decode": 1600.0, "without_decode": 200.0}


def stage_cpu_us(run: dict[str, Any], n_images: int) -> dict[str, float]:
    """CPU microseconds per image of each stage of an ngt-ray run, from Ray Data's per-operator
    stats and the model actors' phases: read, decode, screen bookkeeping (the model stage less its
    confirmation and output: batching, host-to-device, the rounds, the algorithm), confirm
    pass-through (confirmation and output rows), write."""
    per = 1e6 / max(n_images, 1)
    confirm = run.get("cpu_seconds_confirm", 0.0) + run.get("cpu_seconds_output", 0.0)
    model = run.get("cpu_seconds_op_model", 0.0)
    return {
        "read": run.get("cpu_seconds_op_read", 0.0) * per,
        "decode": (run.get("cpu_seconds_op_decode", 0.0) + run.get("cpu_seconds_decode", 0.0)) * per,
        "screen_bookkeeping": max(model - confirm - run.get("cpu_seconds_decode", 0.0), 0.0) * per,
        "confirm_pass_through": confirm * per,
        "write": run.get("cpu_seconds_op_write", 0.0) * per,
    }


@dataclass(frozen=True)
class _Cluster:
    """What the runs reserve: the cluster's CPUs and GPUs, and the device the JSON is named after."""

    on_gpu: bool
    cpus: float
    gpus: float
    device_name: str

    @classmethod
    def of(cls, cfg: BenchmarkConfig) -> _Cluster:
        resources = ray.cluster_resources()
        on_gpu = resources.get("GPU", 0) > 0 and cfg.device != "cpu"
        name = (torch.cuda.get_device_name(0).replace(" ", "-").lower() if on_gpu and torch.cuda.is_available()
                else f"cpu-{int(resources.get('CPU', 1))}-cores")
        return cls(on_gpu, resources.get("CPU", 0), resources.get("GPU", 0) if on_gpu else 0,
                   name + ("-stub-models" if cfg.stub_models else ""))


def run_benchmark(cfg: BenchmarkConfig) -> dict[str, Any]:
    """Run (a), (b), (c) and (d) on one bucket; write ``<output>/<device>.json`` and the markdown table."""
    if not ray.is_initialized():
        ray.init()
    cluster = _Cluster.of(cfg)
    workdir = cfg.workdir or Path(tempfile.mkdtemp(prefix="ngt-ray-benchmark-"))
    bucket, positives, n_images = _bucket(cfg, workdir)
    runs = {name: _timed(name, pipeline, n_images, cluster)
            for name, pipeline in _pipelines(cfg, bucket, workdir, cluster.on_gpu).items()}
    result = _result(cfg, cluster, runs, workdir, n_images, positives)
    cfg.output.mkdir(parents=True, exist_ok=True)
    (cfg.output / f"{cluster.device_name}.json").write_text(json.dumps(result, indent=2) + "\n")
    write_markdown(cfg.output, cfg.markdown)
    print(_table(result))
    return result


def _bucket(cfg: BenchmarkConfig, workdir: Path) -> tuple[str, set[str], int]:
    """The bucket every run reads (``--input``, or JPEGs made from held-out photos), the names of
    its planted positives (none known for ``--input``) and its size."""
    positives: set[str] = set()
    if cfg.input:
        bucket = cfg.input
    else:
        root, positives = make_jpeg_bucket(labelled_photos(cfg), workdir / "bucket", cfg.n_images, cfg.prevalence,
                                           cfg.width, cfg.height, cfg.seed, cfg.workers, cfg.s3_endpoint)
        bucket = str(root)
    n_images = sum(1 for _ in Path(bucket).glob("*.jpg")) if not bucket.startswith(("s3://", "gs://")) \
        else cfg.n_images
    return bucket, positives, n_images


def _pipelines(cfg: BenchmarkConfig, bucket: str, workdir: Path,
               on_gpu: bool) -> dict[str, Callable[[], dict[str, Any]]]:
    """Each run by name, in the order they run: each returns its stats."""
    from ngt_ray.job.pipeline import run_moderation

    common = {"ray_address": cfg.ray_address, "device": "cuda" if on_gpu else "cpu", "runtime": cfg.runtime,
              "decode": cfg.decode, "measure_time": False, "seed": cfg.seed, "stub_models": cfg.stub_models,
              "actors_per_gpu": cfg.actors_per_gpu, "model": str(get_model(cfg.model)),
              "individual_model": str(get_model(cfg.individual_model)),
              "overwrite": True}  # a re-run in the same --workdir measures again, never resumes

    def group_size(screen: str) -> str:
        """Stand-ins cost no MACs, so --group-size auto would find nothing to save and screen
        nothing: they screen at the screen's trained size."""
        return str(read_card(get_model(screen)).group_size) if cfg.stub_models else "auto"

    def moderate(output: str, **options: Any) -> Callable[[], dict[str, Any]]:
        return lambda: _compact(run_moderation(ModerationConfig(
            input=bucket, output=str(workdir / output), **{**common, **options})))

    # on a GPU, --group-size auto chooses k from seconds measured there (MACs mislead it)
    pipelines = {
        "plain": lambda: _plain(bucket, workdir / "plain", cfg, on_gpu),
        "individual": moderate("individual", group_size="none"),
        "ngt": moderate("ngt", group_size=group_size(cfg.model), measure_time=on_gpu),
    }
    if cfg.cascade_model:
        pipelines["cascade"] = moderate("cascade", group_size=group_size(cfg.cascade_model), measure_time=on_gpu,
                                        model=str(get_model(cfg.cascade_model)), individual_model=None)
    if cfg.compare_decode:
        pipelines["ngt_cpu_decode"] = moderate("ngt-cpu-decode", measure_time=on_gpu, decode="cpu")
    return pipelines


def _timed(name: str, pipeline: Callable[[], dict[str, Any] | None], n_images: int,
           cluster: _Cluster) -> dict[str, Any]:
    """One run's wall time, throughput, reserved core- and GPU-seconds and GPU busy, beside its stats."""
    start = time.perf_counter()
    with _GpuSampler() as gpu:
        stats = pipeline()
    wall = time.perf_counter() - start
    log.info("%s: %.1f images/s", name, n_images / wall)
    return {"wall_seconds": wall, "images_per_s": n_images / wall,
            "cpu_core_seconds_per_million": wall * cluster.cpus / n_images * 1e6,
            "gpu_seconds_per_million": wall * cluster.gpus / n_images * 1e6, "gpu_utilisation": gpu.mean,
            **(stats or {})}


def _result(cfg: BenchmarkConfig, cluster: _Cluster, runs: dict[str, dict[str, Any]], workdir: Path,
            n_images: int, positives: set[str]) -> dict[str, Any]:
    """The benchmark's JSON: throughput ratios to the plain recipe, how the runs' flags agree and
    which planted positives each found, and (c)'s CPU cost per image by stage."""
    plain = _flags(workdir / "plain")
    individual, ngt = (_flags(workdir / name / "flags") for name in ("individual", "ngt"))
    agree = sum(plain[name] == individual.get(name) for name in plain)
    stages = stage_cpu_us(runs["ngt"], n_images)
    without_decode = sum(v for k, v in stages.items() if k != "decode")
    return {
        "device": cluster.device_name, "n_images": n_images, "prevalence": cfg.prevalence,
        "image_size": f"{cfg.width}x{cfg.height}" if not cfg.input else "as given",
        "stub_models": cfg.stub_models,
        "plain_images_per_s": runs["plain"]["images_per_s"],
        "individual_images_per_s": runs["individual"]["images_per_s"],
        "ngt_images_per_s": runs["ngt"]["images_per_s"],
        "individual_over_plain": runs["individual"]["images_per_s"] / runs["plain"]["images_per_s"],
        "ngt_over_plain": runs["ngt"]["images_per_s"] / runs["plain"]["images_per_s"],
        **({"cascade_over_plain": runs["cascade"]["images_per_s"] / runs["plain"]["images_per_s"]}
           if "cascade" in runs else {}),
        "flags_agree_plain_individual": agree / max(len(plain), 1),
        "flagged": {"plain": sum(plain.values()), "individual": sum(individual.values()), "ngt": sum(ngt.values())},
        "planted_positives": len(positives),
        "planted_found": {name: sum(flags.get(p, False) for p in positives)
                          for name, flags in (("plain", plain), ("individual", individual), ("ngt", ngt))},
        "planted_found_by_plain_missed_by_ngt": sorted(p for p in positives if plain.get(p) and not ngt.get(p)),
        "cpu_us_per_image": {**stages, "total": sum(stages.values()), "total_without_decode": without_decode},
        "cpu_us_budget": BUDGET_US,
        "runs": runs, "cluster": {"cpus": cluster.cpus, "gpus": cluster.gpus},
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(cfg).items()},
    }


_COMPACT = ("images", "errors", "flagged", "compute_saving", "time_saving", "decode", "runtime", "mean_group_size",
            "group_tests", "retests", "stream_seconds", "device_seconds", "device_busy_share", "top_phases",
            "batch_size", "max_actors", "model", "individual_model", "warmup_seconds", "compile_seconds",
            "compile_cache_hits", "model_call_shapes", "cold_model_calls", "padded_share")


def _compact(stats: dict) -> dict:
    return {k: v for k, v in stats.items()
            if k in _COMPACT or k.startswith(("seconds_", "cpu_seconds_"))}


def _table(r: dict[str, Any]) -> str:
    rows = [f"### {r['device']}: {r['n_images']} JPEGs ({r['image_size']}), prevalence {r['prevalence']}", "",
            "| pipeline | images/s | vs plain | core-s / M images | GPU-s / M images | GPU busy | flagged "
            "| compute_saving | warm-up s (compile s) | shapes | cold calls | top phases |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, label in (("plain", "(a) plain Ray Data recipe"), ("individual", "(b) ngt-ray, no grouping"),
                        ("ngt", "(c) ngt-ray, group testing"), ("cascade", "(d) ngt-ray, cascade"),
                        ("ngt_cpu_decode", "(c) with --decode cpu")):
        if name not in r["runs"]:
            continue
        run = r["runs"][name]
        busy = "n/a" if run.get("gpu_utilisation") is None else f"{run['gpu_utilisation']:.0%}"
        warm = (f"{run['warmup_seconds']:.1f} ({run.get('compile_seconds', 0.0):.1f})" if "warmup_seconds" in run
                else "")
        rows.append(f"| {label} | {run['images_per_s']:.1f} | {run['images_per_s'] / r['plain_images_per_s']:.2f}x | "
                    f"{run['cpu_core_seconds_per_million']:.3g} | {run['gpu_seconds_per_million']:.3g} | {busy} | "
                    f"{r['flagged'].get(name, run.get('flagged', ''))} | {run.get('compute_saving', 0.0):.3f} | "
                    f"{warm} | {run.get('model_call_shapes', '')} | {run.get('cold_model_calls', '')} | "
                    f"{run.get('top_phases', '')} |")
    rows += ["", (f"Flags of (a) and (b) agree on {r['flags_agree_plain_individual']:.2%} of images; planted "
             f"positives found: {r['planted_found']} of {r['planted_positives']}."), ""]
    if r.get("note"):
        rows += [f"Note: {r['note']}", ""]
    if "cpu_us_per_image" in r:
        us, budget = r["cpu_us_per_image"], r["cpu_us_budget"]
        rows += [f"CPU microseconds per image in (c){' with stub models' if r.get('stub_models') else ''}:", "",
                 "| read | decode | screen bookkeeping | confirm pass-through | write | total (budget) "
                 "| without decode (budget) |", "|---|---|---|---|---|---|---|",
                 f"| {us['read']:.0f} | {us['decode']:.0f} | {us['screen_bookkeeping']:.0f} | "
                 f"{us['confirm_pass_through']:.0f} | {us['write']:.0f} | {us['total']:.0f} "
                 f"({budget['with_decode']:.0f}) | {us['total_without_decode']:.0f} ({budget['without_decode']:.0f}) |",
                 ""]
    return "\n".join(rows)


def write_markdown(folder: Path, markdown: Path) -> None:
    """``docs/benchmarks.md``: one table per device JSON in ``folder``."""
    parts = ["# Benchmarks", "", ("Written by `ngt-ray benchmark` (`jobs/benchmark.py`); one section per device, "
             "each from one run over one bucket. Core-seconds and GPU-seconds are reserved resources "
             "(wall time x the cluster's CPUs or GPUs); GPU busy is nvidia-smi's utilisation sampled every "
             "200 ms during the run. `-stub-models` sections replace every model by a near-zero-compute stand-in, "
             "so they show the cost of everything but the models."), ""]
    for path in sorted(Path(folder).glob("*.json")):
        result = json.loads(path.read_text())
        if "device" in result:  # other jobs' JSON shares the folder (first-output.json)
            parts.append(_table(result))
    markdown.write_text("\n".join(parts))
