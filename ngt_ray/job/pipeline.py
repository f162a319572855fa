"""The moderation job: bucket in, per-image flags and one stats row out, assembled like its diagram.

    read bytes -> decode (CPU tasks; or inside the model actors with --decode gpu)
      -> moderate (actor pool: screen with group tests on cached embeddings, confirm the
         candidates with the individual model) -> <output>/flags/*.parquet -> <output>/stats.parquet

``plan`` (``ngt_ray.job.plan``) decides everything up front without Ray; ``build`` is the Ray Data
chain; ``summarise`` writes the stats row, with where the time went. Before the stream starts, one
task on the actors' kind of resource measures what each stage costs there, at the actors' batch
size and with their runtime levers. Everything streams; only the stats row is gathered.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

import pyarrow.parquet as pq
import ray
import ray.data
from ray.data._internal.savemode import SaveMode

from ngt_ray.grouptesting.cost_table import StageCosts
from ngt_ray.job.contracts import FLAGS_SCHEMA
from ngt_ray.job.phases import collect, operator_cpu_seconds, start_ledger
from ngt_ray.job.plan import DECODERS, JobPlan, ModerationConfig, actor_placement, plan
from ngt_ray.job.sources import read_source
from ngt_ray.job.stages import Moderator, decode_batch
from ngt_ray.job.stats import STATS_COLUMNS, phase_columns, summarize
from ngt_ray.nets.profiling import stage_seconds
from ngt_ray.nets.runtime import accelerate, pick_device
from ngt_ray.nets.stubs import load_model
from ngt_ray.storage import resolve

__all__ = ["DECODERS", "ModerationConfig", "actor_placement", "build", "run_moderation", "summarise"]

# Memory reserved per decode task: a batch of encoded and decoded images with room. It also
# keeps Ray Data from fusing decode into the model actor, where it would run serially with
# inference (fusion needs equal remote arguments).
_DECODE_MEMORY = 512 * 2**20


def _measure_seconds(p: JobPlan) -> StageCosts:
    """Per-stage seconds on the device this task was scheduled on (the actors' kind), with the
    actors' models, runtime levers and batch size."""
    dev, spec = pick_device(p.actor.device), p.actor
    screen, card = load_model(p.screen_path, stub=spec.stub_models, map_location=dev)
    individual, individual_card = load_model(spec.individual_model, stub=spec.stub_models, map_location=dev)
    screen, _ = accelerate(screen, dev, card.input_size, spec.runtime)
    individual, _ = accelerate(individual, dev, individual_card.input_size, spec.runtime)
    return stage_seconds(screen, individual, card.input_size, individual_card.input_size, p.timing_sizes, dev,
                         batch=p.timing_batch)


@contextlib.contextmanager
def _ordered(ordered: bool) -> Iterator[None]:
    """Blocks in input order while the job runs (``ordered``), so every batch holds the same images
    on every run: the groups (seeded by the batch's first key), and so every decision, are
    reproducible for a seed."""
    options = ray.data.DataContext.get_current().execution_options
    before, options.preserve_order = options.preserve_order, ordered
    try:
        yield
    finally:
        options.preserve_order = before


def build(p: JobPlan) -> ray.data.Dataset:
    """read -> decode -> moderate: the lazy Ray Data chain of a plan (``write`` consumes it)."""
    cfg = p.cfg
    ds = read_source(resolve(cfg.input, cfg.s3_endpoint), cfg.input_format, image_column=cfg.image_column,
                     key_column=cfg.key_column)
    if p.decode_in_tasks:  # draft-mode JPEG decode on any node, CPU-only ones included; uint8 onwards
        # One decode block is one model batch: the actor takes it as it is, with no concatenation.
        ds = ds.map_batches(decode_batch, fn_kwargs={"size": p.decode_size, "ledger": p.actor.ledger},
                            batch_size=p.batch_size, batch_format="numpy", num_cpus=1, memory=_DECODE_MEMORY,
                            scheduling_strategy="SPREAD")
    ds = ds.map_batches(
        Moderator, fn_constructor_kwargs={"spec": p.actor}, batch_size=p.batch_size, batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=p.placement.max_actors),
        **p.placement.resources,
    )
    return ds


def summarise(p: JobPlan, ledger: ray.actor.ActorHandle, operators: dict[str, float], stream_seconds: float,
              wall_seconds: float) -> dict:
    """Write ``<output>/stats.parquet`` from the flags as written and the phase ledger, and return
    its row."""
    dst = resolve(p.cfg.output, p.cfg.s3_endpoint)
    flags = dst.join("flags")
    dst.fs.invalidate_cache()  # the workers wrote; the driver's listing cache has not seen it
    written = ray.data.read_parquet(flags.path, filesystem=dst.arrow_fs).select_columns(
        STATS_COLUMNS
    ) if dst.fs.exists(flags.path) else ray.data.from_arrow(FLAGS_SCHEMA.empty_table())
    phases = collect(ledger, written.count())
    info = {**p.info, **phase_columns(phases, operators, stream_seconds, p.placement)}
    stats = summarize(written, p.actor.macs, p.actor.seconds, info, wall_seconds)
    with dst.fs.open(dst.join("stats.parquet").path, "wb") as f:
        pq.write_table(stats, f)
    return stats.to_pylist()[0]


def run_moderation(cfg: ModerationConfig) -> dict:
    """Run the job end to end and return the stats row as a dict."""
    if not ray.is_initialized():
        ray.init()
    start = time.perf_counter()
    p = plan(cfg, ray.cluster_resources())
    if cfg.measure_time:
        p = p.with_seconds(ray.get(ray.remote(_measure_seconds).options(**p.placement.resources).remote(p)))
    ledger = start_ledger()
    try:
        p = p.with_ledger(ledger)
        dst = resolve(cfg.output, cfg.s3_endpoint)
        stream_start = time.perf_counter()
        ds = build(p)
        with _ordered(cfg.ordered):
            ds.write_parquet(dst.join("flags").path, filesystem=dst.arrow_fs, mode=SaveMode.OVERWRITE)
        stream_seconds = time.perf_counter() - stream_start
        return summarise(p, ledger, operator_cpu_seconds(ds), stream_seconds, time.perf_counter() - start)
    finally:
        ray.kill(ledger)
