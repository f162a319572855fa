"""``ngt-ray``: moderate a bucket; train, calibrate, compress and evaluate the models; benchmark; demo."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
from pathlib import Path

__all__ = ["main"]


def _group_size(value: str) -> int | str:
    if value == "auto":
        return value
    try:
        k = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"group size must be a positive integer or 'auto', got {value!r}") from None
    if k < 1:
        raise argparse.ArgumentTypeError(f"group size must be >= 1, got {k}")
    return k


def _sizes(value: str) -> tuple[int, ...]:
    return tuple(int(v) for v in value.split(","))


def _add_moderate_args(p: argparse.ArgumentParser) -> None:
    from ngt_ray.algorithms import ALGORITHMS
    from ngt_ray.checkpoint import DEFAULT_INDIVIDUAL_MODEL
    from ngt_ray.model import DESIGNS

    p.add_argument("--design", default="tree", choices=DESIGNS,
                   help="merge design: picks the packaged screen model (ignored with --model)")
    p.add_argument("--algorithm", default="halving", choices=[*ALGORITHMS, "individual"],
                   help="dorfman: two rounds; halving: positive groups split in halves on cached embeddings; "
                        "overlap: every image in two groups, non-adaptive; individual: no grouping, every image "
                        "through the individual model (the baseline)")
    p.add_argument("--model", default=None, help="screen (group) checkpoint stem (default: the packaged one)")
    p.add_argument("--individual-model", default=str(DEFAULT_INDIVIDUAL_MODEL), help="confirmation checkpoint stem")
    p.add_argument("--group-size", type=_group_size, default="auto",
                   help="k images per group test, or 'auto' (default) to choose k per batch from measured costs")
    p.add_argument("--min-size", type=int, default=1, help="halving stops at groups this small and confirms them")
    p.add_argument("--prevalence-prior", type=float, default=0.01, help="starting prevalence for --group-size auto")
    p.add_argument("--no-timing", action="store_true", help="skip measuring per-stage time (no time_saving)")
    p.add_argument("--decode", default="auto", choices=["auto", "cpu", "gpu"],
                   help="cpu: Pillow (draft-mode JPEG) in CPU tasks; gpu: batched nvJPEG inside the model actors, "
                        "per-image CPU fallback; auto: gpu when the actors have GPUs and under 8 CPUs per GPU")
    p.add_argument("--runtime", default="fast", choices=["eager", "fast", "compiled"],
                   help="runtime levers: fast folds batch norm (and uses channels-last bf16 on GPU); compiled adds "
                        "torch.compile with CUDA graphs")
    p.add_argument("--s3-endpoint", default=None, help="S3 endpoint URL (default: $AWS_ENDPOINT_URL or AWS)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random group assignment")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--max-actors", type=int, default=None, help="ceiling of the model actor pool")
    p.add_argument("--actors-per-gpu", type=int, default=2,
                   help="model actors sharing each GPU (one computes while another does its CPU work)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="images per model call (default: 1024 on GPU, 256 on CPU; 512/32 without a screen)")
    p.add_argument("--stub-models", action="store_true",
                   help="near-zero-compute stand-ins for both models: measures everything but the models")
    p.add_argument("--ray-address", default=None, help="Ray cluster address (default: local Ray or $RAY_ADDRESS)")


def _print_summary(stats: dict, output: str) -> None:
    timing = f", time saving {stats['time_saving']:.1%}" if stats["time_saving"] == stats["time_saving"] else ""
    print(
        f"\n{stats['images']} images, {stats['errors']} errors, {stats['flagged']} flagged; "
        f"{stats['algorithm']}, {stats['design']} merge: {stats['group_tests']} group tests "
        f"(first round {stats['first_round_groups']} of {stats['mean_group_size']:.1f}) + {stats['retests']} "
        f"confirmations; compute saving {stats['compute_saving']:.1%}{timing}; "
        f"{stats['images_per_second']:.1f} images/s\n"
        f"time: {stats['top_phases'] or 'no phases recorded'} of the actors' time; model phases held the "
        f"{stats['device']} {stats['device_busy_share']:.0%} of the stream's {stats['stream_seconds']:.1f} s "
        f"(an upper bound on busy)\n"
        f"flags: {output.rstrip('/')}/flags/   stats: {output.rstrip('/')}/stats.parquet"
    )


def _init_ray(address: str | None) -> None:
    import ray

    if not ray.is_initialized():
        ray.init(address=address)


def _moderate(args: argparse.Namespace) -> int:
    from ngt_ray.pipeline import ModerationConfig, run_moderation

    _init_ray(args.ray_address)
    cfg = ModerationConfig(
        input=args.input, output=args.output, model=args.model, individual_model=args.individual_model,
        group_size=args.group_size, input_format=args.format, image_column=args.image_column,
        key_column=args.key_column, s3_endpoint=args.s3_endpoint, seed=args.seed, device=args.device,
        **_algorithm_kwargs(args),
    )
    stats = run_moderation(cfg)
    _print_summary(stats, args.output)
    return 0


def _algorithm_kwargs(args: argparse.Namespace) -> dict:
    return {"design": args.design, "algorithm": args.algorithm, "min_size": args.min_size,
            "prevalence_prior": args.prevalence_prior, "measure_time": not args.no_timing, "runtime": args.runtime,
            "decode": args.decode, "max_actors": args.max_actors, "actors_per_gpu": args.actors_per_gpu,
            "batch_size": args.batch_size, "stub_models": args.stub_models}


def _train(args: argparse.Namespace) -> int:
    from ngt_ray.train import TrainConfig, train

    cards = train(TrainConfig(
        data=Path(args.data), output=Path(args.output), group_size=args.group_size, design=args.design,
        merge_depths=args.merge_depths, train_from=args.train_from, max_negatives=args.max_negatives,
        steps=args.steps, screen_size=args.screen_size, val_groups=args.val_groups,
        calibration_sizes=args.calibration_sizes, target_recall=args.target_recall,
        hard_negative_fraction=args.hard_negative_fraction, seed=args.seed, device=args.device,
        individual=not args.no_individual,
    ))
    for kind, card in cards.items():
        print(f"{kind}: threshold {card.threshold:.4f}; validation {json.dumps(card.validation)}")
    return 0


def _calibrate(args: argparse.Namespace) -> int:
    from ngt_ray.calibrate import recalibrate

    card = recalibrate(args.model, Path(args.data), args.sizes, args.target_recall, args.groups, args.seed,
                       args.device)
    print(f"{'size':>5} {'threshold':>10} {'recall':>7} {'neg. pass':>9} {'AUC':>6}")
    for size, row in sorted(card.calibration.items(), key=lambda kv: int(kv[0])):
        print(f"{size:>5} {row['threshold']:>10.4f} {row['recall']:>7.3f} {row['negative_pass_rate']:>9.3f} "
              f"{row['auc']:>6.3f}")
    return 0


def _compress(args: argparse.Namespace) -> int:
    from ngt_ray.compress import CompressConfig, compress

    report = compress(CompressConfig(
        model=Path(args.model), output=Path(args.output), data=Path(args.data), prune_ratio=args.prune_ratio,
        prune_steps=args.prune_steps, global_ranking=not args.uniform, easier_steps=args.easier_steps,
        finetune_steps=args.finetune_steps,
        acceptance_sizes=args.acceptance_sizes, acceptance_groups=args.acceptance_groups,
        target_recall=args.target_recall, max_negatives=args.max_negatives, val_groups=args.val_groups,
        report=Path(args.report) if args.report else None, seed=args.seed, device=args.device,
    ))
    first, final = report["steps"][0], report["final"]
    print(f"{report['output']}: shared params {final['shared_params'] / first['shared_params']:.2f}x, "
          f"MACs per image {final['macs_per_image'] / first['macs_per_image']:.2f}x, screen latency "
          f"{final['screen_ms_per_batch'] / first['screen_ms_per_batch']:.2f}x of the original; "
          f"FN {final['false_negatives']} vs {first['false_negatives']}, AUC {final['auc']:.3f} vs {first['auc']:.3f}")
    return 0


def _benchmark(args: argparse.Namespace) -> int:
    from ngt_ray.benchmark import BenchmarkConfig, run_benchmark
    from ngt_ray.datasets import shared_data_root

    _init_ray(args.ray_address)
    run_benchmark(BenchmarkConfig(
        data=Path(args.data) if args.data else shared_data_root() / "caltech101",
        workdir=Path(args.workdir or tempfile.mkdtemp(prefix="ngt-ray-benchmark-")), output=Path(args.output),
        markdown=Path(args.markdown), input=args.input, n_images=args.n_images, prevalence=args.prevalence,
        decode=args.decode, runtime=args.runtime, device=args.device, seed=args.seed, stub_models=args.stub_models,
        actors_per_gpu=args.actors_per_gpu, workers=args.workers, compare_decode=args.compare_decode,
    ))
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from ngt_ray.evaluate import EvaluationConfig, evaluate

    evaluate(EvaluationConfig(
        data=Path(args.data) if args.data else None, models=args.models, output=Path(args.output),
        sizes=args.sizes, prevalences=args.prevalences, algorithms=tuple(args.algorithms.split(",")),
        population=args.population, trials=args.trials, seed=args.seed, device=args.device,
        timing=not args.no_timing,
    ))
    return 0


def _demo(args: argparse.Namespace) -> int:
    from ngt_ray.datasets import shared_data_root
    from ngt_ray.demo import build_bucket, recall_of
    from ngt_ray.pipeline import ModerationConfig, run_moderation

    data = Path(args.data) if args.data else shared_data_root() / "caltech101"
    work = Path(args.workdir or tempfile.mkdtemp(prefix="ngt-ray-demo-"))
    bucket = build_bucket(data, work / "bucket", prevalence=args.prevalence, max_images=args.max_images,
                          seed=args.seed)
    print(f"bucket: {bucket.count} photos at {bucket.root}, {len(bucket.positives)} planted positives")
    _init_ray(args.ray_address)
    output = str(work / "results")
    stats = run_moderation(ModerationConfig(input=str(bucket.root), output=output, model=args.model,
                                            individual_model=args.individual_model, group_size=args.group_size,
                                            seed=args.seed, device=args.device, **_algorithm_kwargs(args)))
    recall, hits = recall_of(Path(output) / "flags", bucket.positives)
    _print_summary(stats, output)
    print(f"recall of planted positives: {hits}/{len(bucket.positives)} = {recall:.1%}; "
          f"false positives: {stats['flagged'] - hits}; compute_saving: {stats['compute_saving']:.3f}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ngt-ray", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("moderate", help="flag rare harmful images in a bucket with group testing")
    p.add_argument("--input", required=True, help="folder or fsspec URL (s3://bucket/prefix)")
    p.add_argument("--output", required=True, help="folder or fsspec URL for flags/ and stats.parquet")
    p.add_argument("--format", default="auto", choices=["auto", "images", "webdataset", "parquet"])
    p.add_argument("--image-column", default=None, help="Parquet column with image bytes")
    p.add_argument("--key-column", default=None, help="Parquet column with a unique key per image")
    _add_moderate_args(p)
    p.set_defaults(func=_moderate)

    from ngt_ray.calibrate import DEFAULT_SIZES
    from ngt_ray.model import DESIGNS

    sizes_help = "comma-separated group sizes to calibrate"
    p = sub.add_parser("train", help="fine-tune and calibrate the individual and group models")
    p.add_argument("--data", required=True, help="Caltech-101 folder (holding train/)")
    p.add_argument("--output", default="ngt_ray/checkpoints")
    p.add_argument("--design", default="feature", choices=DESIGNS)
    p.add_argument("--group-size", type=int, default=8, help="k of the training groups")
    p.add_argument("--merge-depths", type=_sizes, default=None,
                   help="stage indices where groups merge (default by design: pixel 0, feature 4, tree 4,6,8)")
    p.add_argument("--train-from", type=int, default=None, help="first fine-tuned stage (default: first merge)")
    p.add_argument("--max-negatives", type=int, default=1500, help="negatives per split (CPU-sized default)")
    p.add_argument("--steps", type=int, default=900, help="fine-tuning steps of the group model")
    p.add_argument("--screen-size", type=int, default=160, help="input size of the group (screen) model")
    p.add_argument("--val-groups", type=int, default=600, help="validation groups per calibrated size")
    p.add_argument("--calibration-sizes", type=_sizes, default=DEFAULT_SIZES, help=sizes_help)
    p.add_argument("--target-recall", type=float, default=0.99, help="of positive groups (and positive images)")
    p.add_argument("--hard-negative-fraction", type=float, default=0.25)
    p.add_argument("--no-individual", action="store_true", help="do not write the individual model")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.set_defaults(func=_train)

    p = sub.add_parser("calibrate", help="re-calibrate a screen model's per-size thresholds on validation groups")
    p.add_argument("--model", required=True, help="screen checkpoint stem; its card is rewritten")
    p.add_argument("--data", required=True, help="Caltech-101 folder (holding train/)")
    p.add_argument("--sizes", type=_sizes, default=DEFAULT_SIZES, help=sizes_help)
    p.add_argument("--target-recall", type=float, default=0.99, help="of positive groups")
    p.add_argument("--groups", type=int, default=600, help="validation groups per size")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.set_defaults(func=_calibrate)

    p = sub.add_parser("compress", help="prune and linearise a screen model while it misses no more positives")
    p.add_argument("--model", required=True, help="screen checkpoint stem to compress")
    p.add_argument("--output", required=True, help="stem of the compressed checkpoint")
    p.add_argument("--data", required=True, help="Caltech-101 folder (holding train/)")
    p.add_argument("--prune-ratio", type=float, default=0.25, help="share of the shared stages' channels to remove")
    p.add_argument("--prune-steps", type=int, default=2, help="pruning steps, each fine-tuned and judged")
    p.add_argument("--uniform", action="store_true",
                   help="every layer loses the same share (default: channels ranked across layers)")
    p.add_argument("--easier-steps", type=int, default=1, help="activations EASIER tries to linearise")
    p.add_argument("--finetune-steps", type=int, default=250, help="distillation steps after each pruning step")
    p.add_argument("--acceptance-sizes", type=_sizes, default=(2, 4, 8), help="group sizes of the held-out judge")
    p.add_argument("--acceptance-groups", type=int, default=300, help="held-out groups per size (x2)")
    p.add_argument("--target-recall", type=float, default=0.99)
    p.add_argument("--max-negatives", type=int, default=1500)
    p.add_argument("--val-groups", type=int, default=600, help="validation groups per calibrated size")
    p.add_argument("--report", default=None, help="stem of the JSON + markdown report (default: beside --output)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.set_defaults(func=_compress)

    p = sub.add_parser("evaluate", help="designs x algorithms x k x prevalence on held-out photos: table, plots")
    p.add_argument("--data", default=None, help="Caltech-101 folder (default: ../shared/data/caltech101)")
    p.add_argument("--models", nargs="+", default=None, help="screen checkpoint stems (default: every packaged one)")
    p.add_argument("--output", default="docs/evaluation", help="folder for Parquet, markdown and PNG plots")
    p.add_argument("--sizes", type=_sizes, default=(2, 4, 8, 16, 32))
    p.add_argument("--prevalences", type=lambda v: tuple(float(x) for x in v.split(",")),
                   default=(0.001, 0.005, 0.01, 0.05))
    p.add_argument("--algorithms", default="dorfman,halving,overlap")
    p.add_argument("--population", type=int, default=None, help="images per simulated bucket (default: all negatives)")
    p.add_argument("--trials", type=int, default=3, help="buckets per cell (different positives and groups)")
    p.add_argument("--no-timing", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.set_defaults(func=_evaluate)

    p = sub.add_parser("benchmark", help="plain Ray Data recipe vs ngt-ray without and with grouping, one run")
    p.add_argument("--n-images", type=int, default=2000, help="JPEGs of 500x375 made from held-out photos")
    p.add_argument("--prevalence", type=float, default=0.001)
    p.add_argument("--input", default=None, help="a folder of JPEGs to use instead of a generated bucket")
    p.add_argument("--data", default=None, help="Caltech-101 folder (default: ../shared/data/caltech101)")
    p.add_argument("--output", default="docs/benchmarks", help="folder for <device>.json")
    p.add_argument("--markdown", default="docs/benchmarks.md")
    p.add_argument("--workdir", default=None)
    p.add_argument("--decode", default="auto", choices=["auto", "cpu", "gpu"])
    p.add_argument("--runtime", default="fast", choices=["eager", "fast", "compiled"])
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stub-models", action="store_true",
                   help="near-zero-compute stand-ins for every model: the CPU cost of everything else, per stage")
    p.add_argument("--actors-per-gpu", type=int, default=2)
    p.add_argument("--workers", type=int, default=None, help="processes that build the bucket (default: all cores)")
    p.add_argument("--compare-decode", action="store_true", help="also run (c) with --decode cpu")
    p.add_argument("--ray-address", default=None)
    p.set_defaults(func=_benchmark)

    p = sub.add_parser("demo", help="plant positives in a local bucket of real photos and moderate it")
    p.add_argument("--data", default=None, help="Caltech-101 folder (default: ../shared/data/caltech101)")
    p.add_argument("--prevalence", type=float, default=0.01)
    p.add_argument("--max-images", type=int, default=None, help="cap on negatives (default: all of the test split)")
    p.add_argument("--workdir", default=None)
    _add_moderate_args(p)
    p.set_defaults(func=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    chatty = args.verbose or args.command in ("train", "compress", "benchmark")
    logging.basicConfig(level=logging.INFO if chatty else logging.WARNING,
                        format="%(asctime)s %(name)s %(message)s")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
