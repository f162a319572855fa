"""The job's plan: everything decided before a single image streams, as plain frozen data.

``plan(cfg, cluster)`` loads the models once on the CPU to count their MACs and read their
cards, and decides the sizes, thresholds, resources and batch sizes from the cluster's resources.
It touches no Ray, so it is unit-tested on its own; ``ngt_ray.job.pipeline`` turns a plan into the
Ray Data chain.
"""

from __future__ import annotations

import argparse
import functools
import logging
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ngt_ray.grouptesting.algorithms import ALGORITHMS, get_algorithm
from ngt_ray.grouptesting.calibration import ScreenQuality
from ngt_ray.grouptesting.cost_table import StageCosts, plan_sizes
from ngt_ray.grouptesting.group_size import GroupSize
from ngt_ray.grouptesting.planning import choose_group_size, expected_cost
from ngt_ray.job.contracts import ActorSpec
from ngt_ray.job.placement import Nodes, Placement, PlacementError, actor_placement, cluster_totals
from ngt_ray.job.preflight import UsageError, check_values
from ngt_ray.job.stages import decode_memory
from ngt_ray.nets.checkpoint import (
    DEFAULT_INDIVIDUAL_MODEL,
    default_screen_model,
    default_screens,
    individual_model_for,
    read_card,
)
from ngt_ray.nets.loading import load_model
from ngt_ray.nets.model import DESIGNS
from ngt_ray.nets.profiling import stage_macs
from ngt_ray.nets.runtime import RUNTIMES
from ngt_ray.nets.shapes import CallSizes
from ngt_ray.options import Common, option
from ngt_ray.storage import Location, resolve

log = logging.getLogger(__name__)

__all__ = ["DECODERS", "JobPlan", "ModerationConfig", "Placement", "actor_placement", "plan"]

DECODERS = ("auto", "cpu", "gpu")


def _group_size(value: str) -> GroupSize:
    try:
        return GroupSize.parse(value)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


@dataclass(frozen=True, kw_only=True)
class OnCluster(Common):
    """Options of the commands that run on Ray."""

    ray_address: str | None = option(None, "Ray cluster address (default: local Ray or $RAY_ADDRESS)")


@dataclass(frozen=True, kw_only=True)
class ModerationConfig(OnCluster):
    """Everything a user chooses for one job; defaults are declared here and nowhere else."""

    input: str = option(help="folder or fsspec URL (s3://bucket/prefix)")
    output: str = option(help="folder or fsspec URL for flags/ and stats.parquet")
    input_format: str = option("auto", "input form: auto looks at the first object",
                               choices=("auto", "images", "webdataset", "parquet"))
    input_manifest: str | None = option(None, "Parquet/CSV of object keys (full URLs, or relative to --input), or "
                                              "an S3 Inventory manifest.json: read by key, with no listing")
    image_column: str | None = option(None, "Parquet column with image bytes (default: detected)")
    key_column: str | None = option(None, "column with a unique key per image in Parquet input, or the key "
                                          "column of --input-manifest (default: detected)")
    s3_endpoint: str | None = option(None, "S3 endpoint URL (default: $AWS_ENDPOINT_URL or AWS)")
    design: str = option("auto", "picks the packaged screen model (ignored with --model): a merge design, the "
                                 "cascade (no grouping, a low-resolution forward), or auto: the one the planner "
                                 "expects to cost least at --prevalence-prior", choices=lambda: ["auto", *DESIGNS])
    model: str | None = option(None, "screen (group) checkpoint stem (default: the packaged one of --design)")
    individual_model: str | None = option(None, "confirmation checkpoint stem (default: the packaged individual "
                                                "model of the screen's class)")
    algorithm: str = option("halving", "group-testing algorithm (ngt_ray.grouptesting.algorithms)",
                            choices=lambda: list(ALGORITHMS))
    group_size: GroupSize = option(GroupSize.AUTO, "k images per group test; auto: chosen per batch from the "
                                                   "measured costs and prevalence (groups may differ between runs; "
                                                   "fix k to reproduce them); none: no group test, every image "
                                                   "through the individual model (the baseline savings are "
                                                   "measured against)", parse=_group_size)
    min_size: int = option(1, "halving stops at groups this small and confirms their members")
    prevalence_prior: float = option(0.01, "starting prevalence of the running estimate behind --group-size auto")
    measure_time: bool = option(True, "time each stage on the actors' device and report time_saving")
    runtime: str = option("fast", "runtime levers of both models (ngt_ray.nets.runtime)", choices=RUNTIMES)
    decode: str = option("auto", "cpu: Pillow (draft-mode JPEG) in CPU tasks; gpu: nvJPEG in the model actors; "
                                 "auto: gpu where the cluster has under 8 CPUs per GPU", choices=DECODERS)
    batch_size: int | None = option(None, "images per model call (default: 1024 on GPU, 256 on CPU; "
                                          "512/32 without a screen)")
    max_actors: int | None = option(None, "model actor pool ceiling (default: on GPUs none, so the pool grows "
                                          "as GPU nodes join; on CPUs what the nodes hold beside their "
                                          "read/decode tasks)")
    actors_per_gpu: int = option(2, "model actors sharing each GPU (one computes while another does its CPU work)")
    stub_models: bool = option(False, "near-zero-compute stand-ins for both models: measures everything but them")
    ordered: bool = option(True, "process blocks in input order, so the same bucket and seed give the same groups "
                                 "and flags on every run (off: never wait on a slow task)")
    rows_per_file: int = option(4096, "rows per flags file (a hint to Ray Data): the unit of work a re-run after an "
                                      "interruption keeps")
    overwrite: bool = option(False, "replace results of another configuration at --output (only once this "
                                    "run is complete; without it such a run is refused)")
    report: bool = option(False, "when the run ends, write its review page to <output>/report/index.html "
                                 "(ngt-ray report)")
    wait_for_lease: bool = option(False, "where another run is writing to --output (holds its lease), wait until "
                                         "it ends or its lease expires, then resume after it (without it such a "
                                         "run is refused)")
    actor_start_timeout: float = option(600.0, "seconds to wait for the first model actor to start before failing "
                                               "with a clear error (an autoscaling cluster may need minutes)")
    extra_info: dict = option({}, cli=False)

    def __post_init__(self) -> None:  # 8, "8", "auto" or "none" in code, as on the command line
        object.__setattr__(self, "group_size", GroupSize.parse(self.group_size))


# Decode placement: a batched nvJPEG call still costs the model actor's own CPU (about half a
# millisecond an image), taken from the loop that feeds the GPU, while decode tasks spread over every
# core of the node. Decode moves onto the GPU only where CPUs are what is short (docs/status.md
# has the measurement behind it).
_CPUS_PER_GPU_FOR_CPU_DECODE = 8


def _few_cpus_per_gpu(nodes: Nodes) -> bool:
    totals = cluster_totals(nodes)
    gpus = totals.get("GPU", 0)
    return bool(gpus) and totals.get("CPU", 0) / gpus < _CPUS_PER_GPU_FOR_CPU_DECODE


@dataclass(frozen=True)
class JobPlan:
    """The decided job: what each actor gets, where it runs, how batches and decode are shaped."""

    cfg: ModerationConfig
    source: Location  # the input, resolved once: every reader and the driver's checks use this
    actor: ActorSpec
    placement: Placement
    batch_size: int
    decode_in_tasks: bool  # CPU decode tasks (else the model actors decode)
    decode_size: int  # the input size the decode tasks produce
    screen_path: str  # the screen model whose costs the stats report (also without a screen)
    timing_sizes: list[int]  # group sizes the timing task measures
    timing_batch: int  # images per timed call: the actors' batch on a GPU
    info: dict[str, Any]  # the stats row's descriptive columns

    @property
    def screened(self) -> bool:
        return self.actor.screen_model is not None

    def with_seconds(self, seconds: StageCosts | None) -> JobPlan:
        return replace(self, actor=replace(self.actor, seconds=seconds))

    def with_ledger(self, ledger: Any) -> JobPlan:
        return replace(self, actor=replace(self.actor, ledger=ledger))


def _validate(cfg: ModerationConfig) -> None:
    try:
        get_algorithm(cfg.algorithm)  # raises, naming the registered ones
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if cfg.decode not in DECODERS:
        raise UsageError(f"decode must be one of {DECODERS}, got {cfg.decode!r}")
    if cfg.runtime not in RUNTIMES:
        raise UsageError(f"runtime must be one of {RUNTIMES}, got {cfg.runtime!r}")
    check_values(cfg)  # sizes, counts, the prior: also checked before Ray starts (ngt_ray.job.preflight)


def _check_decode_fits(nodes: Nodes, batch: int, size: int) -> None:
    """A decode task reserves the memory its batch needs (``decode_memory``); where no node has that
    much, it would wait forever: say so now. Nodes that do not report memory are not judged."""
    memory = [node["memory"] for node in nodes if "memory" in node]
    need, least = decode_memory(batch, size), decode_memory(1, size)
    if not memory or max(memory) >= need:
        return
    fix = "use a smaller --batch-size" if max(memory) >= least else \
        f"nodes need at least {least / 2**30:.1f} GiB for Ray to schedule a decode task"
    raise PlacementError(f"a decode task of {batch} images needs {need / 2**30:.1f} GiB of memory and the largest "
                         f"node offers {max(memory) / 2**30:.1f} GiB; {fix}")


@functools.cache
def _screen_macs(screen: str, individual: str) -> StageCosts:
    """MACs of a screen and its confirmation at every size the screen's calibrated sizes test;
    counted once per process (flop counting a tree screen at 32 sizes takes seconds)."""
    screen_model, card = load_model(screen)
    individual_model, individual_card = load_model(individual)
    return stage_macs(screen_model, individual_model, card.input_size, individual_card.input_size,
                      plan_sizes(card.calibrated_sizes))


# The largest model call. On a GPU, large enough that one call fills the device (a screen batch of
# 1024 at k = 8 is 128 groups, one call); on a CPU, where a bigger call is no faster per image,
# small, so that warming every shape of the ladder costs seconds (about 52 images per model at 16).
_CALL_ROWS = {"cuda": 256, "cpu": 16}


def call_sizes(batch: int, on_gpu: bool) -> int:
    """The top of the closed set of call shapes (``ngt_ray.nets.shapes``): a screen embeds a batch
    in pieces of this many images, and every other call (the groups of a round, a halving retest,
    the candidates to confirm) is padded up the ladder below it or split at it."""
    return max(1, min(batch, _CALL_ROWS["cuda" if on_gpu else "cpu"]))


def cheapest_screen(cfg: ModerationConfig) -> tuple[str, dict[str, float]]:
    """The packaged screen of the default class with the lowest expected cost per image at the
    prevalence prior (MACs, each at its best calibrated k), and every candidate's cost as a share of
    the individual model's: the default job never spends more than the cheapest honest option.
    Only screens confirmed by the same individual model compete."""
    individual = cfg.individual_model or str(DEFAULT_INDIVIDUAL_MODEL)
    costs = {}
    for stem in default_screens():
        card = read_card(stem)
        if cfg.individual_model is None and individual_model_for(card) != DEFAULT_INDIVIDUAL_MODEL:
            continue
        macs = _screen_macs(str(stem), individual)
        quality = ScreenQuality.from_card(card.calibration)
        p = cfg.prevalence_prior
        k = choose_group_size(cfg.algorithm, card.calibrated_sizes, p, macs, quality, cfg.min_size)
        costs[str(stem)] = expected_cost(cfg.algorithm, k, p, macs, quality, cfg.min_size) / macs.confirm
    if not costs:
        return str(default_screen_model("tree")), {}
    best = min(costs, key=costs.get)
    log.info("screen: %s (expected cost per image, share of the individual model's: %s)", Path(best).name,
             ", ".join(f"{Path(s).name} {c:.3f}" for s, c in costs.items()))
    return best, {Path(s).name: c for s, c in costs.items()}


def plan(cfg: ModerationConfig, nodes: Nodes | Mapping[str, float]) -> JobPlan:
    """Decide the job for a cluster of ``nodes``, each node's total resources (``[{"CPU": 16, "GPU": 1}]``;
    one mapping is one node)."""
    nodes = [nodes] if isinstance(nodes, Mapping) else list(nodes)
    _validate(cfg)
    group_size = cfg.group_size
    individual = not group_size.screened
    choice: dict[str, float] = {}
    if cfg.model:
        model = cfg.model
    elif cfg.design == "auto" and not cfg.stub_models:
        model, choice = cheapest_screen(cfg)
    else:
        model = str(default_screen_model("tree" if cfg.design == "auto" else cfg.design))
    screen_model, screen_card = load_model(model, stub=cfg.stub_models)
    individual_stem = cfg.individual_model or str(individual_model_for(screen_card))
    individual_model, individual_card = load_model(individual_stem, stub=cfg.stub_models)
    fixed = group_size.mode == "fixed"
    k = group_size.k
    if fixed and k not in screen_card.calibration and k != screen_card.group_size:
        log.warning("group size %d was not calibrated for %s; using the threshold of the nearest calibrated size",
                    k, model)
    # auto and none count the screen's costs at every calibrated size (none: the stats still name the screen)
    sizes = plan_sizes(k if fixed else screen_card.calibrated_sizes)
    macs = (_screen_macs(model, individual_stem) if not fixed and not cfg.stub_models else
            stage_macs(screen_model, individual_model, screen_card.input_size, individual_card.input_size, sizes))

    placement = actor_placement(nodes, cfg.device, cfg.max_actors, cfg.actors_per_gpu)
    on_gpu = placement.on_gpu
    # A screen batch holds many groups of the largest size, so a GPU sees large launches; without
    # a screen, a plain model batch.
    batch = cfg.batch_size or ((512 if on_gpu else 32) if individual else (1024 if on_gpu else 256))
    decode_here = cfg.decode == "gpu" or (cfg.decode == "auto" and on_gpu and _few_cpus_per_gpu(nodes))
    decode_size = individual_card.input_size if individual else screen_card.input_size
    if not decode_here:
        _check_decode_fits(nodes, batch, decode_size)
    device = "cuda" if on_gpu else "cpu"
    calls = call_sizes(batch, on_gpu)
    source = resolve(cfg.input, cfg.s3_endpoint)
    actor = ActorSpec(
        individual_model=individual_stem, screen_model=None if individual else model,
        algorithm=cfg.algorithm, group_size=group_size, seed=cfg.seed, min_size=cfg.min_size,
        prevalence_prior=cfg.prevalence_prior, macs=macs, seconds=None, device=device,
        threads=placement.threads, runtime=cfg.runtime, decode_here=decode_here, stub_models=cfg.stub_models,
        input_root=source.object_uri(source.path).rstrip("/") + "/",
        screen_calls=CallSizes.up_to(calls, per_image=True), confirm_calls=CallSizes.up_to(calls),
    )
    info = {
        "group_size": str(group_size),  # "auto": chosen per batch, mean_group_size says what was used
        "model": Path(model).name,
        "individual_model": Path(individual_stem).name,
        "backbone": screen_card.backbone,
        "design": "none" if individual else screen_card.design,
        "algorithm": "none" if individual else cfg.algorithm,
        "merge_depths": ",".join(map(str, screen_card.merge_depths or [screen_card.merge_at])),
        "screen_input_size": screen_card.input_size,
        "individual_input_size": individual_card.input_size,
        "group_threshold": screen_card.threshold_for(k) if fixed else screen_card.threshold,
        "individual_threshold": individual_card.threshold,
        "input": cfg.input,
        "device": device,
        "runtime": cfg.runtime,
        "decode": "gpu" if decode_here else "cpu",
        "batch_size": batch,
        "model_call_rows_max": calls,
        "max_actors": placement.max_actors,
        "stub_models": cfg.stub_models,
        # the planner's expected cost per image of each packaged screen, as a share of the individual's
        "screen_choice": ", ".join(f"{name} {cost:.3f}" for name, cost in choice.items()),
        **cfg.extra_info,
    }
    return JobPlan(
        cfg=cfg, source=source, actor=actor, placement=placement, batch_size=batch, decode_in_tasks=not decode_here,
        decode_size=decode_size, screen_path=model,
        timing_sizes=sizes, timing_batch=batch if on_gpu else 8, info=info,
    )
