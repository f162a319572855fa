"""``ngt-ray``: moderate a bucket; train, calibrate, compress and evaluate the models; benchmark; demo; submit
any of moderate, train, evaluate and benchmark to a Ray cluster as a job, and follow, list or stop it.

Every subcommand's options are generated from its config dataclass (``ngt_ray.options``): help,
choices and defaults are declared once, on the config.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
from pathlib import Path

from ngt_ray.cluster.connect import ClusterError, OnDashboard
from ngt_ray.cluster.jobs import JobConfig, LogsConfig
from ngt_ray.cluster.submit import EPILOG as SUBMIT_EPILOG
from ngt_ray.cluster.submit import SUBMITTABLE, SubmitConfig
from ngt_ray.job.plan import ModerationConfig
from ngt_ray.options import add_options, from_args
from ngt_ray.tools.benchmark import BenchmarkConfig
from ngt_ray.tools.calibrate import CalibrateConfig
from ngt_ray.tools.compress import CompressConfig
from ngt_ray.tools.demo import DemoConfig
from ngt_ray.tools.evaluate import EvaluationConfig
from ngt_ray.tools.train import TrainConfig

__all__ = ["build_parser", "main"]

# the demo makes its own bucket and output folder
_DEMO_SKIPS = ("input", "output", "input_format", "image_column", "key_column", "s3_endpoint", "input_manifest",
               "overwrite")


def _print_summary(stats: dict, output: str) -> None:
    timing = f", time saving {stats['time_saving']:.1%}" if stats["time_saving"] == stats["time_saving"] else ""
    screened_some = stats["design"] != "none"
    unscreened = f" ({stats['unscreened']} confirmed unscreened)" if stats["unscreened"] and screened_some else ""
    resumed = f" ({stats['resumed_rows']} kept from an earlier attempt)" if stats.get("resumed_rows") else ""
    compiled = (f" ({stats['compile_seconds']:.1f} s compiling, {stats['compile_cache_hits']} graphs from the "
                f"node's cache)" if stats["runtime"] == "compiled" else "")
    print(
        f"\n{stats['images']} images{resumed}, {stats['errors']} errors, {stats['flagged']} flagged; "
        f"{stats['algorithm']}, {stats['design']} merge: {stats['group_tests']} group tests "
        f"(first round {stats['first_round_groups']} of {stats['mean_group_size']:.1f}) + {stats['retests']} "
        f"confirmations{unscreened}; compute saving {stats['compute_saving']:.1%}{timing}; "
        f"{stats['images_per_second']:.1f} images/s on {stats.get('nodes', 1)} node(s)\n"
        f"time: {stats['top_phases'] or 'no phases recorded'} of the actors' time; model phases held the "
        f"{stats['device']} {stats['device_busy_share']:.0%} of the stream's {stats['stream_seconds']:.1f} s "
        f"(an upper bound on busy)\n"
        f"warm-up: {stats['warmup_seconds']:.1f} s over {stats['warmed_actors']} actor(s)"
        f"{compiled}, {stats['model_call_shapes']} call shapes per actor, {stats['cold_model_calls']} cold calls, "
        f"{stats['padded_share']:.0%} of model rows padding\n"
        f"flags: {output.rstrip('/')}/flags/   stats: {output.rstrip('/')}/stats.parquet"
    )


def _init_ray(address: str | None) -> None:
    from ngt_ray.job.pipeline import init_ray

    init_ray(address)


def _moderate(args: argparse.Namespace) -> int:
    from ngt_ray.job.pipeline import run_moderation

    cfg = from_args(ModerationConfig, args)
    _init_ray(cfg.ray_address)
    _print_summary(run_moderation(cfg), cfg.output)
    return 0


def _train(args: argparse.Namespace) -> int:
    from ngt_ray.tools.train import train

    for kind, card in train(from_args(TrainConfig, args)).items():
        print(f"{kind}: threshold {card.threshold:.4f}; validation {json.dumps(card.validation)}")
    return 0


def _calibrate(args: argparse.Namespace) -> int:
    from ngt_ray.tools.calibrate import recalibrate

    cfg = from_args(CalibrateConfig, args)
    card = recalibrate(cfg.model, cfg.photos, cfg.sizes, cfg.target_recall, cfg.groups, cfg.seed, cfg.device)
    print(f"{'size':>5} {'threshold':>10} {'recall':>7} {'neg. pass':>9} {'AUC':>6}")
    for size, row in sorted(card.calibration.items()):
        print(f"{size:>5} {row.threshold:>10.4f} {row.recall:>7.3f} {row.negative_pass_rate:>9.3f} {row.auc:>6.3f}")
    return 0


def _compress(args: argparse.Namespace) -> int:
    from ngt_ray.tools.compress import compress

    report = compress(from_args(CompressConfig, args))
    first, final = report["steps"][0], report["final"]
    print(f"{report['output']}: shared params {final['shared_params'] / first['shared_params']:.2f}x, "
          f"MACs per image {final['macs_per_image'] / first['macs_per_image']:.2f}x, screen latency "
          f"{final['screen_ms_per_batch'] / first['screen_ms_per_batch']:.2f}x of the original; "
          f"FN {final['false_negatives']} vs {first['false_negatives']}, AUC {final['auc']:.3f} vs {first['auc']:.3f}")
    return 0


def _benchmark(args: argparse.Namespace) -> int:
    from ngt_ray.tools.benchmark import run_benchmark

    cfg = from_args(BenchmarkConfig, args)
    _init_ray(cfg.ray_address)
    run_benchmark(cfg)
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from ngt_ray.tools.evaluate import evaluate

    evaluate(from_args(EvaluationConfig, args))
    return 0


def _demo(args: argparse.Namespace) -> int:
    from ngt_ray.job.pipeline import run_moderation
    from ngt_ray.tools.demo import build_bucket, recall_of

    demo = from_args(DemoConfig, args)
    work = demo.workdir or Path(tempfile.mkdtemp(prefix="ngt-ray-demo-"))
    bucket = build_bucket(demo.photos, work / "bucket", prevalence=demo.prevalence, max_images=demo.max_images,
                          seed=args.seed, manifest=demo.manifest, paste=demo.paste)
    print(f"bucket: {bucket.count} photos at {bucket.root}, {len(bucket.positives)} planted positives")
    output = str(work / "results")
    # the bucket was just rebuilt: its earlier results (same folder, same config) no longer apply
    cfg = from_args(ModerationConfig, args, input=str(bucket.root), output=output, overwrite=True)
    _init_ray(cfg.ray_address)
    stats = run_moderation(cfg)
    recall, hits = recall_of(Path(output) / "flags", bucket.positives)
    _print_summary(stats, output)
    print(f"recall of planted positives: {hits}/{len(bucket.positives)} = {recall:.1%}; "
          f"false positives: {stats['flagged'] - hits}; compute_saving: {stats['compute_saving']:.3f}")
    return 0


def _submit(args: argparse.Namespace) -> int:
    from ngt_ray.cluster.submit import submit

    return submit(from_args(SubmitConfig, args), build_parser().parse_args)


def _status(args: argparse.Namespace) -> int:
    from ngt_ray.cluster.jobs import status

    return status(from_args(JobConfig, args))


def _logs(args: argparse.Namespace) -> int:
    from ngt_ray.cluster.jobs import logs

    return logs(from_args(LogsConfig, args))


def _stop(args: argparse.Namespace) -> int:
    from ngt_ray.cluster.jobs import stop

    return stop(from_args(JobConfig, args))


def _list(args: argparse.Namespace) -> int:
    from ngt_ray.cluster.jobs import list_jobs

    return list_jobs(from_args(OnDashboard, args))


_COMMANDS = (
    # name, help, handler, configs (with the fields they leave to others)
    ("moderate", "flag rare harmful images in a bucket with group testing", _moderate, [(ModerationConfig, ())]),
    ("train", "fine-tune and calibrate the individual and group models", _train, [(TrainConfig, ())]),
    ("calibrate", "re-calibrate a screen model's per-size thresholds on validation groups", _calibrate,
     [(CalibrateConfig, ())]),
    ("compress", "prune and linearise a screen model while it misses no more positives", _compress,
     [(CompressConfig, ())]),
    ("evaluate", "designs x algorithms x k x prevalence on held-out photos: table, plots", _evaluate,
     [(EvaluationConfig, ())]),
    ("benchmark", "plain Ray Data recipe vs ngt-ray without and with grouping, one run", _benchmark,
     [(BenchmarkConfig, ())]),
    ("demo", "plant positives in a local bucket of real photos and moderate it", _demo,
     [(DemoConfig, ()), (ModerationConfig, _DEMO_SKIPS)]),
    ("submit", f"run {', '.join(SUBMITTABLE)} as a job on a Ray cluster: submit [options] <verb> <its options>",
     _submit, [(SubmitConfig, ())]),
    ("status", "a submitted job's status", _status, [(JobConfig, ())]),
    ("logs", "a submitted job's logs", _logs, [(LogsConfig, ())]),
    ("stop", "stop a submitted job and wait until it has stopped", _stop, [(JobConfig, ())]),
    ("list", "the jobs submitted to a cluster", _list, [(OnDashboard, ())]),
)

# Positional arguments, each read into the config field of its name (fields with cli=False). They
# are optional to argparse so that a missing one gets the handler's message, which says what to give.
_JOB_ID = ("job_id", {"nargs": "?", "metavar": "ID", "help": "the job's submission id"})
_POSITIONALS = {
    "submit": [("verb", {"nargs": "?", "help": f"one of {', '.join(SUBMITTABLE)}"}),
               ("verb_args", {"nargs": argparse.REMAINDER, "help": "the verb's options, as it takes them here"})],
    "status": [_JOB_ID], "logs": [_JOB_ID], "stop": [_JOB_ID],
}
_EPILOGS = {"submit": SUBMIT_EPILOG}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ngt-ray", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_text, handler, configs in _COMMANDS:
        p = sub.add_parser(name, help=help_text, description=help_text, epilog=_EPILOGS.get(name))
        for config, skip in configs:
            add_options(p, config, skip=skip)
        for dest, kwargs in _POSITIONALS.get(name, ()):
            p.add_argument(dest, **kwargs)
        p.set_defaults(func=handler)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    chatty = args.verbose or args.command in ("train", "compress", "benchmark")
    logging.basicConfig(level=logging.INFO if chatty else logging.WARNING,
                        format="%(asctime)s %(name)s %(message)s")
    try:
        return args.func(args)
    except Exception as exc:  # a known cause is told in one line; anything else raises as it is
        cause = _user_error(exc)
        if cause is None or args.verbose:
            raise
        print(f"ngt-ray {args.command}: {cause}", file=sys.stderr)
        return 2


def _user_error(exc: BaseException) -> BaseException | None:
    """The error a user can act on behind ``exc``, if any: a cluster, output, placement or storage
    refusal, even when Ray raised it from a task (its cause chain keeps the original)."""
    from ngt_ray.job.fetch import StorageError
    from ngt_ray.job.outputs import OutputError
    from ngt_ray.job.placement import PlacementError

    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, (ClusterError, OutputError, PlacementError, StorageError)):
            return seen
        seen = seen.__cause__ or seen.__context__
    return None


if __name__ == "__main__":
    sys.exit(main())
