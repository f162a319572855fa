"""``ngt-ray``: moderate a bucket; train, calibrate, compress and evaluate the models; benchmark; demo; submit
any of moderate, train, evaluate and benchmark to a Ray cluster as a job, and follow, list or stop it.

Every subcommand's options are generated from its config dataclass (``ngt_ray.options``): help,
choices and defaults are declared once, on the config.
"""

from __future__ import annotations

import argparse
import errno
import json
import logging
import re
import sys
import tempfile
import traceback
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

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
from ngt_ray.tools.report import ReportConfig
from ngt_ray.tools.train import TrainConfig

if TYPE_CHECKING:
    from ngt_ray.report import Report

__all__ = ["build_parser", "main"]

# the demo makes its own bucket and output folder
_DEMO_SKIPS = ("input", "output", "input_format", "image_column", "key_column", "s3_endpoint", "input_manifest",
               "overwrite", "report")  # and it always builds the report


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
    # run_moderation starts Ray (at --ray-address) after its checks, holding the output's lease: a refusal is quick
    stats = run_moderation(cfg)
    _print_summary(stats, cfg.output)
    if cfg.report:  # after _SUCCESS: the page shows what the run presented
        from ngt_ray.report import build_report

        _print_report(build_report(cfg.output, s3_endpoint=cfg.s3_endpoint), opened=False)
    return 0


def _print_report(report: Report, opened: bool) -> None:
    from ngt_ray.report.build import local_copy

    where = local_copy(report).as_uri() if opened else report.index
    parts = ", ".join(f"{name} {seconds:.1f}" for name, seconds in report.seconds_by_part.items())
    print(f"report: {where} ({report.thumbnails} images shown, {report.without_thumbnail} without a thumbnail; "
          f"built in {report.seconds:.1f} s: {parts})")


def _report(args: argparse.Namespace) -> int:
    from ngt_ray.job.preflight import UsageError
    from ngt_ray.report import build_report

    cfg = from_args(ReportConfig, args)
    if not cfg.output:
        raise UsageError("name the run's output folder or URL: ngt-ray report <output>")
    if cfg.max_thumbnails < 0 or cfg.near_threshold < 0:
        raise UsageError("--max-thumbnails and --near-threshold must be 0 or more")
    if cfg.ray_address:  # big runs make their thumbnails in Ray tasks: on this cluster
        _init_ray(cfg.ray_address)
    report = build_report(cfg.output, s3_endpoint=cfg.s3_endpoint, max_thumbnails=cfg.max_thumbnails,
                          near_threshold=cfg.near_threshold)
    _print_report(report, opened=cfg.open)
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
    from ngt_ray.report import build_report

    _print_report(build_report(output), opened=True)
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
    ("report", "the review page of a finished run: flagged thumbnails, scores, plots, errors, labels.csv export",
     _report, [(ReportConfig, ())]),
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
    "report": [("output", {"nargs": "?", "help": "the run's --output: a folder or an s3:// (any fsspec) URL"})],
}
_EPILOGS = {"submit": SUBMIT_EPILOG}


class _Parser(argparse.ArgumentParser):
    """argparse's parser, telling a usage error in two lines (what is wrong, where the options are
    listed) instead of the whole usage, which is twenty lines for ``moderate``."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n{self.prog}: `{self.prog} --help` lists the options\n")


_DEBUG_HELP = "on an error, print the traceback as well as the one-line message"


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="ngt-ray", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress (INFO)")
    parser.add_argument("--debug", action="store_true", help=_DEBUG_HELP)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_text, handler, configs in _COMMANDS:
        p = sub.add_parser(name, help=help_text, description=help_text, epilog=_EPILOGS.get(name))
        # also after the command (and so inside a submitted job's arguments); SUPPRESS keeps the
        # parent's value when it is not given here
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=_DEBUG_HELP)
        for config, skip in configs:
            add_options(p, config, skip=skip)
        for dest, kwargs in _POSITIONALS.get(name, ()):
            p.add_argument(dest, **kwargs)
        p.set_defaults(func=handler)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run a command; on an error, one line on stderr (``--debug``: the traceback before it) and the
    exit code of its kind: 2 for a usage error (options that cannot run as given: a bad value, an
    unknown model, an output inside the input, an output that holds another run's results, a plan no
    cluster node can hold, a cluster refusal), 1 for a run that failed (storage missing, empty,
    unreadable or unreachable, credentials missing or refused, anything unexpected)."""
    args = build_parser().parse_args(argv)
    chatty = args.verbose or args.command in ("train", "compress", "benchmark")
    logging.basicConfig(level=logging.INFO if chatty else logging.WARNING,
                        format="%(asctime)s %(name)s %(message)s")
    try:
        return args.func(args)
    except KeyboardInterrupt:
        if args.debug:
            traceback.print_exc()
        print(f"ngt-ray {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        code, message = _failure(exc)
        if args.debug:
            traceback.print_exc()
        print(f"ngt-ray {args.command}: {message}", file=sys.stderr)
        return code


# OSErrors whose message names the file and says enough: a permission, a read-only disk, a full one
_DISK_ADVICE = {errno.EACCES: "check its permissions, or choose another --output",
                errno.EPERM: "check its permissions, or choose another --output",
                errno.EROFS: "the filesystem is read-only: choose another --output",
                errno.ENOSPC: "the disk is full: free some space or choose another --output",
                errno.EDQUOT: "a disk quota is exhausted: free some space or choose another --output",
                errno.EFBIG: "a file size limit was hit: raise it or choose another --output",
                errno.ENOTDIR: "a file is where a folder must be", errno.EISDIR: "a folder is where a file must be"}
# how a Ray task's error names the original exception in its text, when only the text crossed over
_REMOTE_ERROR = re.compile(r"^([A-Za-z_][\w.]*): (.*)$", re.MULTILINE)


def _causes(exc: BaseException) -> list[BaseException]:
    """``exc`` and what it wraps: its cause or context, and for a Ray task's error the exception it carries."""
    out: list[BaseException] = []
    seen: BaseException | None = exc
    while seen is not None and seen not in out:
        out.append(seen)
        seen = getattr(seen, "cause", None) if _from_ray_task(seen) else (seen.__cause__ or seen.__context__)
    return out


def _from_ray_task(exc: BaseException) -> bool:
    return any(cls.__name__ == "RayTaskError" for cls in type(exc).__mro__)


def _failure(exc: BaseException) -> tuple[int, str]:
    """The exit code and the one line (redacted) that tell what went wrong behind ``exc``, even when
    Ray raised it from a task: its cause chain, or where the chain did not cross, its text."""
    from ngt_ray.job.fetch import StorageError, clean
    from ngt_ray.job.outputs import OutputError
    from ngt_ray.job.placement import PlacementError
    from ngt_ray.job.preflight import UsageError

    codes: list[tuple[type, int]] = [(UsageError, 2), (OutputError, 2), (PlacementError, 2), (ClusterError, 2),
                                     (StorageError, 1)]
    chain = _causes(exc)
    for seen in chain:
        if _from_ray_task(seen):  # its str() is the remote traceback: its cause is the message
            continue
        for kind, code in codes:
            if isinstance(seen, kind):
                return code, clean(str(seen), 600)
    remote = [m for e in chain if _from_ray_task(e) for m in _REMOTE_ERROR.findall(str(e))]
    for name, message in remote:
        module, _, cls_name = name.rpartition(".")
        cls = getattr(sys.modules.get(module), cls_name, None) if module.startswith("ngt_ray.") else None
        for kind, code in codes:
            if isinstance(cls, type) and issubclass(cls, kind):
                return code, clean(message, 600)
    for seen in chain:
        if isinstance(seen, OSError) and seen.errno in _DISK_ADVICE and seen.filename:
            return 1, clean(f"{seen.strerror}: {seen.filename}; {_DISK_ADVICE[seen.errno]}", 600)
    name, message = remote[0] if remote else (type(exc).__name__, str(exc))
    return 1, (f"unexpected error: {name.rpartition('.')[2]}: {clean(message, 400)}; run again with --debug for "
               "the traceback")


if __name__ == "__main__":
    sys.exit(main())
