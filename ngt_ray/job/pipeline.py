"""The moderation job: bucket in, per-image flags and one stats row out, assembled like its diagram.

    read bytes -> decode (CPU tasks; or inside the model actors with --decode gpu)
      -> moderate (actor pool: screen with group tests on cached embeddings, confirm the
         candidates with the individual model) -> <output>/flags/*.parquet -> <output>/stats.parquet

``plan`` (``ngt_ray.job.plan``) decides everything up front without Ray; ``build`` is the Ray Data
chain; ``present_run`` writes the stats row, with where the time went. Before the stream starts, one
task on the actors' kind of resource measures what each stage costs there, at the actors' batch
size and with their runtime levers. Everything streams; only the stats row is gathered.
"""

from __future__ import annotations

import contextlib
import logging
import time
import warnings
from collections.abc import Iterator

import ray
import ray.data

from ngt_ray.grouptesting.cost_table import StageCosts
from ngt_ray.job.contracts import FLAGS_SCHEMA
from ngt_ray.job.fetch import BucketError, retrying_writes
from ngt_ray.job.free_cpu import free_cpu_checked
from ngt_ray.job.lease import OutputLease
from ngt_ray.job.manifests import manifest_paths
from ngt_ray.job.outputs import RunOutput, output_location, run_config
from ngt_ray.job.phases import collect, operator_cpu_seconds, start_ledger
from ngt_ray.job.placement import cluster_nodes
from ngt_ray.job.plan import DECODERS, JobPlan, ModerationConfig, actor_placement, plan
from ngt_ray.job.preflight import check_run, no_new_folder_on_failure
from ngt_ray.job.resume import Finished
from ngt_ray.job.sources import read_source
from ngt_ray.job.stages import Moderator, decode_batch, decode_memory, model_actor_memory
from ngt_ray.job.stats import STATS_COLUMNS, count_flags, phase_columns, stats_row
from ngt_ray.nets.loading import load_model
from ngt_ray.nets.profiling import stage_seconds
from ngt_ray.nets.runtime import accelerate, pick_device
from ngt_ray.storage import require_bucket

__all__ = ["DECODERS", "ModerationConfig", "actor_placement", "build", "init_ray", "present_run", "run_moderation"]

# Decode tasks share workers with the read tasks. A pool of their own (a distinct runtime_env) kept
# a read task's leftover heap out of their measured memory, but on a 2-CPU node Ray's cap on idle
# workers then killed a worker after nearly every task and started another (seconds of importing
# torch each). Their reservation (``decode_memory``) covers a worker
# that ran reads too, and it also keeps Ray Data from fusing decode into the model actor, where it
# would run serially with inference (fusion needs equal remote arguments).
# Writers reserve no CPU: a flags file is a few kB of rows, and a writer that waited for a CPU the
# read and decode tasks hold would hold every flag in the object store until the stream ends (seen
# on 2 cores: nothing written after 10,000 rows), which also leaves an interrupted run nothing to keep.
_WRITE_RESOURCES = {"num_cpus": 0}


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


def build(p: JobPlan, skip: Finished | None = None) -> tuple[ray.data.Dataset, int | None]:
    """read -> decode -> moderate: the lazy Ray Data chain of a plan (``write`` consumes it), and
    the objects the listing found (None where nothing is listed; see ``read_source``). ``skip``
    indexes what earlier attempts of the run wrote (``RunOutput.done``): each read task drops its own
    rows already written."""
    cfg, tasks = p.cfg, p.placement.task_resources
    paths = manifest_paths(cfg.input_manifest, p.source, key_column=cfg.key_column, s3_endpoint=cfg.s3_endpoint,
                           task_cpus=p.placement.task_cpus) if cfg.input_manifest else None
    ds, objects = read_source(p.source, cfg.input_format, image_column=cfg.image_column, key_column=cfg.key_column,
                              paths=paths, skip=skip, task_cpus=p.placement.task_cpus, block_rows=p.batch_size)
    if p.decode_in_tasks:  # draft-mode JPEG decode on any node, CPU-only ones included; uint8 onwards
        # One decode block is one model batch: the actor takes it as it is, with no concatenation.
        ds = ds.map_batches(decode_batch, fn_kwargs={"size": p.decode_size, "ledger": p.actor.ledger},
                            batch_size=p.batch_size, batch_format="pyarrow",
                            memory=decode_memory(p.batch_size, p.decode_size), **tasks)
    ds = ds.map_batches(
        Moderator, fn_constructor_kwargs={"spec": p.actor}, batch_size=p.batch_size, batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=p.placement.pool_max),
        memory=model_actor_memory(p.batch_size, p.decode_size), **p.placement.resources,
    )
    return ds, objects


def present_run(p: JobPlan, ledger: ray.actor.ActorHandle, operators: dict[str, float], stream_seconds: float,
              wall_seconds: float, out: RunOutput, started_at: float, objects: int | None = None) -> dict:
    """Present the run (``RunOutput.commit``: stats.parquet from every row in flags/, then
    ``_SUCCESS``) and return its stats row."""
    flags = out.flags
    flags.fs.invalidate_cache()  # the workers wrote; the driver's listing cache has not seen it
    written = ray.data.read_parquet(flags.path, filesystem=flags.arrow_fs).select_columns(
        STATS_COLUMNS
    ) if flags.fs.exists(flags.path) and flags.fs.find(flags.path) else ray.data.from_arrow(
        FLAGS_SCHEMA.empty_table())
    totals = count_flags(written)  # one read of the flags: the image count and the stats row
    resumed = len(out.done)  # the rows of the flags files it kept, from their footers
    phases = collect(ledger, int(totals["images"]) - resumed)
    first = phases["first_output_at"]
    info = {**p.info, **phase_columns(phases, operators, stream_seconds, p.placement),
            "resumed_rows": resumed, "objects": objects,
            # from the job's start (listing included) to the first model batch's rows: what a
            # bucket-scale listing costs, and what --input-manifest saves
            "seconds_to_first_output": first - started_at if first is not None else float("nan")}
    stats = stats_row(totals, p.actor.macs, p.actor.seconds, info, wall_seconds)
    out.commit(stats)
    return stats.to_pylist()[0]


@contextlib.contextmanager
def _actor_start_timeout(seconds: float) -> Iterator[None]:
    """Fail with Ray Data's "Timed out while starting actors" instead of waiting forever for an
    actor that no node can hold."""
    ctx = ray.data.DataContext.get_current()
    before, ctx.wait_for_min_actors_s = ctx.wait_for_min_actors_s, int(seconds)
    try:
        yield
    finally:
        ctx.wait_for_min_actors_s = before


def init_ray(address: str | None = None) -> None:
    """Connect to ``address`` (or ``$RAY_ADDRESS``), or start a local Ray. A local Ray keeps Ray's
    default, token authentication; the warning Ray logs to say it chose that default (a notice, not
    a problem) is kept off the console."""
    if ray.is_initialized():
        return
    notice = logging.getLogger("ray._private.authentication.authentication_token_setup")
    before = notice.level
    notice.setLevel(logging.ERROR)
    try:
        ray.init(address=address)
    finally:
        notice.setLevel(before)


def run_moderation(cfg: ModerationConfig) -> dict:
    """Run the job end to end and return the stats row as a dict, holding the output's lease
    (``ngt_ray.job.lease``) from before anything there is read until the run ends, however it ends:
    a second run into the same output refuses, or waits for it (``--wait-for-lease``)."""
    check_run(cfg)  # options, input and output, before Ray starts or anything is written (ngt_ray.job.preflight)
    with (no_new_folder_on_failure(cfg),  # a refused run leaves no output folder behind
          OutputLease(wait=cfg.wait_for_lease) as lease):  # released however the run ends; a lost one stops it
        lease.acquire(output_location(cfg.output, cfg.s3_endpoint))  # before Ray starts: a refusal takes seconds
        return _moderate(cfg, lease)


def _moderate(cfg: ModerationConfig, lease: OutputLease) -> dict:
    """The job end to end, under ``lease``; its stats row as a dict.

    The output location is claimed first (``RunOutput.open``: another config's results are refused,
    a missing bucket is an error), and an earlier attempt's rows are skipped, so a re-run after an
    interruption writes only what is missing.
    """
    init_ray(cfg.ray_address)
    # Ray Data's advice for a pool that got fewer blocks than its minimum size (a resumed run with
    # little left) is to split blocks: here a block is one model batch on purpose
    warnings.filterwarnings("ignore", "The minimum number of concurrent actors", UserWarning)
    start, started_at = time.perf_counter(), time.time()
    p = plan(cfg, cluster_nodes())
    if cfg.input_manifest:  # nothing is listed on the driver: a wrong input bucket must still stop the run here
        require_bucket(p.source, "input", BucketError)
    out = RunOutput.open(cfg.output, run_config(cfg), cfg.s3_endpoint, overwrite=cfg.overwrite, lease=lease)
    if cfg.measure_time:
        p = p.with_seconds(ray.get(ray.remote(_measure_seconds).options(**p.placement.resources).remote(p)))
    ledger = start_ledger()
    try:
        p = p.with_ledger(ledger)
        stream_start = time.perf_counter()
        ds, objects = build(p, out.done)
        # free_cpu_checked: the timing task's CPU may still be on its way back to the pool
        with _ordered(cfg.ordered), _actor_start_timeout(cfg.actor_start_timeout), free_cpu_checked():
            # each flags file is one retried put (retrying_writes): complete or absent on a flaky store
            ds.write_parquet(out.flags.path, filesystem=retrying_writes(out.flags.fs), try_create_dir=False,
                             min_rows_per_file=cfg.rows_per_file, ray_remote_args=_WRITE_RESOURCES)
        stream_seconds = time.perf_counter() - stream_start
        return present_run(p, ledger, operator_cpu_seconds(ds), stream_seconds, time.perf_counter() - start, out,
                         started_at, objects)
    finally:
        ray.kill(ledger)
