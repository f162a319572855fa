"""``ngt-ray``: moderate a bucket, train the models, or run the demo."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
from pathlib import Path

__all__ = ["main"]


def _add_moderate_args(p: argparse.ArgumentParser) -> None:
    from ngt_ray.checkpoint import DEFAULT_GROUP_MODEL, DEFAULT_INDIVIDUAL_MODEL

    p.add_argument("--model", default=str(DEFAULT_GROUP_MODEL), help="screen (group) checkpoint stem")
    p.add_argument("--individual-model", default=str(DEFAULT_INDIVIDUAL_MODEL), help="retest checkpoint stem")
    p.add_argument("--group-size", type=int, default=None, help="k images per group test (default: the model's)")
    p.add_argument("--s3-endpoint", default=None, help="S3 endpoint URL (default: $AWS_ENDPOINT_URL or AWS)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random group assignment")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--max-actors", type=int, default=None, help="ceiling of each model actor pool")
    p.add_argument("--ray-address", default=None, help="Ray cluster address (default: local Ray or $RAY_ADDRESS)")


def _print_summary(stats: dict, output: str) -> None:
    print(
        f"\n{stats['images']} images, {stats['errors']} errors, {stats['flagged']} flagged; "
        f"{stats['group_tests']} group tests of {stats['group_size']} + {stats['retests']} retests; "
        f"compute saving {stats['compute_saving']:.1%}; {stats['images_per_second']:.1f} images/s\n"
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
        max_actors=args.max_actors,
    )
    stats = run_moderation(cfg)
    _print_summary(stats, args.output)
    return 0


def _train(args: argparse.Namespace) -> int:
    from ngt_ray.train import TrainConfig, train

    cards = train(TrainConfig(
        data=Path(args.data), output=Path(args.output), group_size=args.group_size, merge_at=args.merge_at,
        max_negatives=args.max_negatives, steps=args.steps, screen_size=args.screen_size, val_groups=args.val_groups,
        target_recall=args.target_recall, seed=args.seed, device=args.device,
    ))
    for kind, card in cards.items():
        print(f"{kind}: threshold {card.threshold:.4f}; validation {json.dumps(card.validation)}")
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
                                            seed=args.seed, device=args.device, max_actors=args.max_actors))
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

    p = sub.add_parser("train", help="fine-tune and calibrate the individual and group models")
    p.add_argument("--data", required=True, help="Caltech-101 folder (holding train/)")
    p.add_argument("--output", default="ngt_ray/checkpoints")
    p.add_argument("--group-size", type=int, default=8)
    p.add_argument("--merge-at", type=int, default=4, help="stage index where group feature maps merge")
    p.add_argument("--max-negatives", type=int, default=1500, help="negatives per split (CPU-sized default)")
    p.add_argument("--steps", type=int, default=900, help="fine-tuning steps of the group model")
    p.add_argument("--screen-size", type=int, default=160, help="input size of the group (screen) model")
    p.add_argument("--val-groups", type=int, default=800)
    p.add_argument("--target-recall", type=float, default=0.95)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.set_defaults(func=_train)

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
    logging.basicConfig(level=logging.INFO if args.verbose or args.command == "train" else logging.WARNING,
                        format="%(asctime)s %(name)s %(message)s")
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
