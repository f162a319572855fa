"""The moderation job: bucket in, per-image flags and one stats row out.

    read bytes -> decode (CPU tasks) -> group screen (actor pool: every round of the group-testing
    algorithm, on cached embeddings) -> confirm (actor pool: individual model on the candidates)
    -> <output>/flags/*.parquet -> <output>/stats.parquet

With ``decode="gpu"`` the decode step moves into the model actors (batched nvJPEG); with
``algorithm="individual"`` there is no screen and every image is confirmed, the baseline the
savings are measured against. Everything streams through Ray Data; only the stats row is
gathered on the driver. Before the stream starts, one task on the actors' kind of resource
measures what each stage costs there.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow.parquet as pq
import ray
import ray.data
from ray.data._internal.savemode import SaveMode

from ngt_ray.algorithms import ALGORITHMS
from ngt_ray.checkpoint import (
    DEFAULT_INDIVIDUAL_MODEL,
    default_screen_model,
    load_checkpoint,
)
from ngt_ray.costs import StageCosts, plan_sizes, stage_macs, stage_seconds
from ngt_ray.runtime import RUNTIMES, accelerate, pick_device
from ngt_ray.sources import read_source
from ngt_ray.stages import (
    FLAGS_SCHEMA,
    Confirm,
    GroupScreen,
    as_candidates,
    decode_batch,
)
from ngt_ray.stats import STATS_COLUMNS, summarize
from ngt_ray.storage import resolve

log = logging.getLogger(__name__)

__all__ = ["DECODERS", "ModerationConfig", "actor_resources", "run_moderation"]

DECODERS = ("auto", "cpu", "gpu")


@dataclass
class ModerationConfig:
    input: str
    output: str
    model: str | None = None  # None: the packaged screen model of ``design``
    individual_model: str = str(DEFAULT_INDIVIDUAL_MODEL)
    design: str = "tree"  # which packaged screen model to use when ``model`` is not given
    algorithm: str = "halving"
    group_size: int | str | None = "auto"  # "auto": chosen per batch; None: the size the model was trained for
    min_size: int = 1  # halving stops at groups of this size and confirms their members
    prevalence_prior: float = 0.01  # starting point of the running estimate for group_size "auto"
    measure_time: bool = True  # time each stage on the actors' device and report time_saving
    runtime: str = "fast"  # runtime levers of both models: eager | fast | compiled (see ngt_ray.runtime)
    decode: str = "auto"  # cpu: Pillow in CPU tasks; gpu: batched in the model actors (nvJPEG); auto: gpu on GPUs
    input_format: str = "auto"
    image_column: str | None = None
    key_column: str | None = None
    s3_endpoint: str | None = None
    seed: int = 0
    device: str = "auto"
    groups_per_batch: int | None = None  # None: 32 on GPU, 8 on CPU
    max_actors: int | None = None  # per model stage; None: one per GPU, or a quarter of the CPUs
    extra_info: dict = field(default_factory=dict)


def actor_resources(device: str = "auto", max_actors: int | None = None,
                    model_stages: int = 2) -> tuple[dict, int, int]:
    """Ray resources per model actor, actor pool ceiling, and torch threads per CPU actor.

    On GPUs the model stages share each GPU (the retest pool is light at low prevalence). On CPUs
    up to three quarters of the cores go to the model stages, always leaving one whole core for
    the read and decode tasks (which draft-mode JPEG decoding keeps cheap); each actor takes up to
    4 cores, so wide nodes get more actors.
    """
    total = ray.cluster_resources()
    gpus = int(total.get("GPU", 0)) if device != "cpu" else 0
    if gpus:
        return {"num_gpus": 1 / model_stages}, max_actors or gpus, 1
    cpus = total.get("CPU", 1)
    share = max(0.5 * model_stages, min(0.75 * cpus, cpus - 1)) / model_stages
    actor_cpus = max(0.5, min(4.0, share))
    ceiling = max_actors or max(1, math.floor(share / actor_cpus))
    return {"num_cpus": actor_cpus}, ceiling, max(1, round(actor_cpus))


def _measure_seconds(model: str, individual_model: str, sizes: list[int], device: str, runtime: str) -> StageCosts:
    """Per-stage seconds on the device this task was scheduled on (the actors' kind), with the
    actors' runtime levers."""
    dev = pick_device(device)
    screen, card = load_checkpoint(model, map_location=dev)
    individual, individual_card = load_checkpoint(individual_model, map_location=dev)
    screen, _ = accelerate(screen, dev, card.input_size, runtime)
    individual, _ = accelerate(individual, dev, individual_card.input_size, runtime)
    return stage_seconds(screen, individual, card.input_size, individual_card.input_size, sizes, dev)


def run_moderation(cfg: ModerationConfig) -> dict:
    """Run the job end to end and return the stats row as a dict."""
    if not ray.is_initialized():
        ray.init()
    start = time.perf_counter()
    if cfg.algorithm not in (*ALGORITHMS, "individual"):
        raise ValueError(f"algorithm must be one of {(*ALGORITHMS, 'individual')}, got {cfg.algorithm!r}")
    if cfg.decode not in DECODERS:
        raise ValueError(f"decode must be one of {DECODERS}, got {cfg.decode!r}")
    if cfg.runtime not in RUNTIMES:
        raise ValueError(f"runtime must be one of {RUNTIMES}, got {cfg.runtime!r}")
    model = cfg.model or str(default_screen_model(cfg.design))
    screen_model, screen_card = load_checkpoint(model)
    individual_model, individual_card = load_checkpoint(cfg.individual_model)
    auto = cfg.group_size == "auto"
    k = None if auto else int(cfg.group_size or screen_card.group_size)
    if k is not None and k < 1:
        raise ValueError(f"group size must be >= 1 or 'auto', got {k}")
    if k is not None and str(k) not in screen_card.calibration and k != screen_card.group_size:
        log.warning("group size %d was not calibrated for %s; using the threshold of the nearest calibrated size",
                    k, model)
    sizes = plan_sizes(screen_card.calibrated_sizes if auto else k)
    macs = stage_macs(screen_model, individual_model, screen_card.input_size, individual_card.input_size, sizes)
    del screen_model, individual_model

    src, dst = resolve(cfg.input, cfg.s3_endpoint), resolve(cfg.output, cfg.s3_endpoint)
    individual = cfg.algorithm == "individual"
    resources, max_actors, threads = actor_resources(cfg.device, cfg.max_actors, 1 if individual else 2)
    on_gpu = "num_gpus" in resources
    device = "cuda" if on_gpu else "cpu"
    seconds = None
    if cfg.measure_time:
        seconds = ray.get(ray.remote(_measure_seconds).options(**resources).remote(
            model, cfg.individual_model, sizes, device, cfg.runtime))
    # a screen batch holds whole groups of the largest size; without grouping, a plain model batch
    batch = (256 if on_gpu else 32) if individual else max(sizes) * (cfg.groups_per_batch or (32 if on_gpu else 8))
    pool = ray.data.ActorPoolStrategy(min_size=1, max_size=max_actors)

    decode_here = cfg.decode == "gpu" or (cfg.decode == "auto" and on_gpu)
    ds = read_source(src, cfg.input_format, image_column=cfg.image_column, key_column=cfg.key_column)
    if not decode_here:  # CPU tasks decode (draft-mode JPEG), uint8 into the object store
        size = individual_card.input_size if individual else screen_card.input_size
        # Spread over every node, CPU-only ones included. The memory reservation (a batch of encoded
        # and decoded images, with room) also keeps Ray Data from fusing decode into the model
        # actor, where it would run serially with inference: fusion needs equal remote args.
        ds = ds.map_batches(decode_batch, fn_kwargs={"size": size}, batch_size=64, batch_format="numpy",
                            num_cpus=1, memory=256 * 2**20, scheduling_strategy="SPREAD")
    common = {"device": device, "threads": threads, "runtime": cfg.runtime, "decode_here": decode_here}
    if individual:  # the baseline: every image through the individual model, same input path
        ds = ds.map_batches(as_candidates, batch_format="numpy")
    else:
        ds = ds.map_batches(
            GroupScreen,
            fn_constructor_kwargs={
                "model_path": model, "algorithm": cfg.algorithm, "group_size": k, "seed": cfg.seed, "macs": macs,
                "seconds": seconds, "min_size": cfg.min_size, "prevalence_prior": cfg.prevalence_prior, **common,
            },
            batch_size=batch, batch_format="numpy", compute=pool, **resources,
        )
    ds = ds.map_batches(
        Confirm,
        fn_constructor_kwargs={"model_path": cfg.individual_model, "macs": macs.confirm,
                               "seconds": seconds.confirm if seconds else None, **common},
        batch_size=batch, batch_format="numpy", compute=pool, **resources,
    )
    flags = dst.join("flags")
    ds.write_parquet(flags.path, filesystem=dst.arrow_fs, mode=SaveMode.OVERWRITE)

    dst.fs.invalidate_cache()  # the workers wrote; the driver's listing cache has not seen it
    written = ray.data.read_parquet(flags.path, filesystem=dst.arrow_fs).select_columns(
        STATS_COLUMNS
    ) if dst.fs.exists(flags.path) else ray.data.from_arrow(FLAGS_SCHEMA.empty_table())
    info = {
        "group_size": 0 if auto else k,  # 0: chosen per batch ("auto"); mean_group_size says what was used
        "model": Path(model).name,
        "individual_model": Path(cfg.individual_model).name,
        "backbone": screen_card.backbone,
        "design": "none" if individual else screen_card.design,
        "algorithm": cfg.algorithm,
        "merge_depths": ",".join(map(str, screen_card.merge_depths or [screen_card.merge_at])),
        "screen_input_size": screen_card.input_size,
        "individual_input_size": individual_card.input_size,
        "group_threshold": screen_card.threshold if auto else screen_card.threshold_for(k),
        "individual_threshold": individual_card.threshold,
        "input": cfg.input,
        "device": device,
        "runtime": cfg.runtime,
        "decode": "gpu" if decode_here else "cpu",
        **cfg.extra_info,
    }
    stats = summarize(written, macs, seconds, info, time.perf_counter() - start)
    with dst.fs.open(dst.join("stats.parquet").path, "wb") as f:
        pq.write_table(stats, f)
    return stats.to_pylist()[0]
