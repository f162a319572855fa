"""Score a split of a labelled manifest with individual models: AUROC and recall at 1 % FPR, with
bootstrap intervals, overall and per source group. Prints a table and writes JSON.

    python jobs/score_split.py --manifest firearm.csv --split test --models STEM [STEM ...] \
        --real-positives firearms --real-negatives scenes --paste 200 --output docs/firearm/test-scores.json

``--paste`` adds copy-paste composites made from the split's own cut-outs and scenes (a small gun
in an everyday scene), scored against every negative and against the real scenes alone: the
hardest subset, since each composite's background is itself one of those negatives.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from ngt_ray.grouptesting.calibration import roc_auc
from ngt_ray.nets.checkpoint import load_checkpoint
from ngt_ray.training.copypaste import pasted_positives
from ngt_ray.training.embeddings import embed_images, score_cached_groups
from ngt_ray.training.labelled import LabelledSet


def _recall_at_fpr(labels: np.ndarray, scores: np.ndarray, fpr: float = 0.01) -> float:
    threshold = np.quantile(scores[labels == 0], 1 - fpr)
    return float((scores[labels == 1] > threshold).mean())


def _interval(labels: np.ndarray, scores: np.ndarray, fn, n: int = 1000, seed: int = 0) -> list[float]:
    """95 % bootstrap interval, positives and negatives resampled separately."""
    rng = np.random.default_rng(seed)
    pos, neg = np.flatnonzero(labels == 1), np.flatnonzero(labels == 0)
    values = []
    for _ in range(n):
        idx = np.concatenate([rng.choice(pos, len(pos)), rng.choice(neg, len(neg))])
        values.append(fn(labels[idx], scores[idx]))
    return [float(np.quantile(values, 0.025)), float(np.quantile(values, 0.975))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--manifest", required=True)
    parser.add_argument("--split", default="test")
    parser.add_argument("--models", nargs="+", required=True)
    parser.add_argument("--real-positives", default="firearms", help="source of the real-scene positives")
    parser.add_argument("--real-negatives", default="scenes", help="source of the real-scene negatives")
    parser.add_argument("--paste", type=int, default=0, help="copy-paste composites added as positives")
    parser.add_argument("--output", default=None)
    args = parser.parse_args()
    labelled = LabelledSet.from_manifest(args.manifest)
    index = {uri: i for i, uri in enumerate(labelled.uris)}
    items = labelled.split(args.split)
    made = pasted_positives(items, args.paste, np.random.default_rng(7))[0] if args.paste else []
    sources = np.array([labelled.sources[index[uri]] for uri, _ in items] + ["composite"] * len(made))
    items = items + made
    labels = np.array([label for _, label in items])
    real = sources != "composite"
    subsets = {"all": real,
               "real scenes": np.isin(sources, [args.real_positives, args.real_negatives])}
    if made:
        subsets |= {"composites": (labels == 0) | ~real,
                    "composites vs scenes": (sources == args.real_negatives) | ~real}
    results = {}
    print(f"{'model':<34} {'subset':<20} {'pos':>4} {'neg':>5} {'AUROC (95 %)':>22} {'recall@1%FPR (95 %)':>24}")
    for stem in args.models:
        model, card = load_checkpoint(stem)
        with torch.inference_mode():
            embedded = embed_images(model, items, card.input_size, 32, torch.device("cpu"))
            scores = torch.sigmoid(score_cached_groups(model, embedded, [[i] for i in range(len(items))],
                                                       torch.device("cpu"))).numpy()
        for name, mask in subsets.items():
            y, s = labels[mask], scores[mask]
            auc, rec = roc_auc(y, s), _recall_at_fpr(y, s)
            auc_i, rec_i = _interval(y, s, roc_auc), _interval(y, s, _recall_at_fpr)
            results[f"{Path(stem).name} / {name}"] = {"positives": int(y.sum()), "negatives": int((1 - y).sum()),
                                                     "auroc": auc, "auroc_interval": auc_i,
                                                     "recall_at_1pct_fpr": rec, "recall_interval": rec_i,
                                                     "recall_at_threshold": float((s[y == 1] >= card.threshold).mean())}
            print(f"{Path(stem).name:<34} {name:<20} {int(y.sum()):>4} {int((1 - y).sum()):>5} "
                  f"{auc:>7.3f} ({auc_i[0]:.2f}-{auc_i[1]:.2f}) {rec:>9.3f} ({rec_i[0]:.2f}-{rec_i[1]:.2f})")
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps({"manifest_split": args.split, "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
