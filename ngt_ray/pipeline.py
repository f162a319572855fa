"""The moderation job: bucket in, per-image flags and one stats row out.

    read bytes -> decode (CPU tasks) -> group screen (actor pool) -> retest (actor pool)
               -> <output>/flags/*.parquet -> <output>/stats.parquet

Everything streams through Ray Data; only the stats row is gathered on the driver.
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

from ngt_ray.checkpoint import DEFAULT_GROUP_MODEL, DEFAULT_INDIVIDUAL_MODEL, load_checkpoint
from ngt_ray.costs import model_costs
from ngt_ray.sources import read_source
from ngt_ray.stages import FLAGS_SCHEMA, GroupScreen, Retest, decode_batch
from ngt_ray.stats import summarize
from ngt_ray.storage import resolve

log = logging.getLogger(__name__)

__all__ = ["ModerationConfig", "run_moderation"]


@dataclass
class ModerationConfig:
    input: str
    output: str
    model: str = str(DEFAULT_GROUP_MODEL)
    individual_model: str = str(DEFAULT_INDIVIDUAL_MODEL)
    group_size: int | None = None  # None: the size the screen model was trained and calibrated for
    input_format: str = "auto"
    image_column: str | None = None
    key_column: str | None = None
    s3_endpoint: str | None = None
    seed: int = 0
    device: str = "auto"
    groups_per_batch: int | None = None  # None: 32 on GPU, 8 on CPU
    max_actors: int | None = None  # per model stage; None: one per GPU, or a quarter of the CPUs
    extra_info: dict = field(default_factory=dict)


def _resources(cfg: ModerationConfig) -> tuple[dict, int, int]:
    """Ray resources per model actor, actor pool ceiling, and torch threads per CPU actor."""
    total = ray.cluster_resources()
    gpus = int(total.get("GPU", 0)) if cfg.device != "cpu" else 0
    if gpus:
        # Screen and retest share each GPU: the retest pool is light at low prevalence.
        return {"num_gpus": 0.5}, cfg.max_actors or gpus, 1
    cpus = total.get("CPU", 1)
    actor_cpus = max(0.5, min(4.0, cpus / 4))
    ceiling = cfg.max_actors or max(1, int(cpus // (4 * actor_cpus)))
    return {"num_cpus": actor_cpus}, ceiling, max(1, math.floor(actor_cpus))


def run_moderation(cfg: ModerationConfig) -> dict:
    """Run the job end to end and return the stats row as a dict."""
    if not ray.is_initialized():
        ray.init()
    start = time.perf_counter()
    screen_model, screen_card = load_checkpoint(cfg.model)
    individual_model, individual_card = load_checkpoint(cfg.individual_model)
    k = cfg.group_size or screen_card.group_size
    if k != screen_card.group_size:
        log.warning("group size %d differs from the %d the screen threshold was calibrated for", k, screen_card.group_size)
    costs = model_costs(screen_model, individual_model, screen_card.input_size, individual_card.input_size)
    del screen_model, individual_model

    src, dst = resolve(cfg.input, cfg.s3_endpoint), resolve(cfg.output, cfg.s3_endpoint)
    resources, max_actors, threads = _resources(cfg)
    on_gpu = "num_gpus" in resources
    device = "cuda" if on_gpu else "cpu"
    batch = k * (cfg.groups_per_batch or (32 if on_gpu else 8))
    pool = ray.data.ActorPoolStrategy(min_size=1, max_size=max_actors)

    ds = read_source(src, cfg.input_format, image_column=cfg.image_column, key_column=cfg.key_column)
    ds = ds.map_batches(decode_batch, fn_kwargs={"size": screen_card.input_size}, batch_size=64, batch_format="numpy")
    ds = ds.map_batches(
        GroupScreen,
        fn_constructor_kwargs={
            "model_path": cfg.model, "group_size": k, "threshold": screen_card.threshold,
            "seed": cfg.seed, "device": device, "threads": threads,
        },
        batch_size=batch, batch_format="numpy", compute=pool, **resources,
    )
    ds = ds.map_batches(
        Retest,
        fn_constructor_kwargs={
            "model_path": cfg.individual_model, "group_threshold": screen_card.threshold,
            "threshold": individual_card.threshold, "device": device, "threads": threads,
        },
        batch_size=batch, batch_format="numpy", compute=pool, **resources,
    )
    flags = dst.join("flags")
    ds.write_parquet(flags.path, filesystem=dst.arrow_fs, mode=SaveMode.OVERWRITE)

    dst.fs.invalidate_cache()  # the workers wrote; the driver's listing cache has not seen it
    written = ray.data.read_parquet(flags.path, filesystem=dst.arrow_fs).select_columns(
        ["flagged", "decided_by", "group_size"]
    ) if dst.fs.exists(flags.path) else ray.data.from_arrow(FLAGS_SCHEMA.empty_table())
    info = {
        "group_size": k,
        "model": Path(cfg.model).name,
        "individual_model": Path(cfg.individual_model).name,
        "backbone": screen_card.backbone,
        "design": screen_card.design,
        "algorithm": "dorfman",
        "merge_at": screen_card.merge_at,
        "screen_input_size": screen_card.input_size,
        "individual_input_size": individual_card.input_size,
        "group_threshold": screen_card.threshold,
        "individual_threshold": individual_card.threshold,
        "input": cfg.input,
        "device": device,
        **cfg.extra_info,
    }
    stats = summarize(written, costs, info, time.perf_counter() - start)
    with dst.fs.open(dst.join("stats.parquet").path, "wb") as f:
        pq.write_table(stats, f)
    return stats.to_pylist()[0]
