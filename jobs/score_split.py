"""Judge individual models on a manifest's held-out split the way the world will: in-scene figures first.

    python jobs/firearm_manifest.py firearm.csv
    python jobs/score_split.py --manifest firearm.csv --models firearm-lite0-individual revolver-lite0-individual \
        --zero-shot 413,763,764 --cross-source --output docs/firearm/test-scores.json

For each model, with 95 % bootstrap intervals (positives and negatives resampled separately):

* **in scene**: the split's in-scene positives (``scene == in_scene``: people holding guns in real
  settings) against its everyday negatives (COCO and everyday scenes, Caltech background and face
  photos): AUROC and recall at 1 % false positives;
* **all**: every positive of the split against every negative;
* **at the model's threshold** (the one the job uses): recall of the in-scene positives, and the
  false-positive rate on everyday, Caltech and knife photos.

``--degraded`` scores degraded copies of the split too (dark, blurred, grey, compressed, as a
CCTV frame or a movie still can be). ``--zero-shot`` adds the backbone's ImageNet head with no
training (the log-probability of those classes): the floor a trained model must beat.
``--cross-source`` trains the candidate head (ImageNet prior, penalty chosen on val) without one
positive source and scores it on that source: what a new source of photos would see. Every model
here shares the frozen backbone at its native size, so the photos are embedded once. Prints a
table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow.csv as pacsv
import torch

from ngt_ray.grouptesting.calibration import roc_auc
from ngt_ray.nets.backbone import build_backbone
from ngt_ray.nets.checkpoint import load_checkpoint
from ngt_ray.nets.decode import decode_image
from ngt_ray.nets.heads import build_head, zero_shot_head
from ngt_ray.nets.model import GroupTestingModel
from ngt_ray.training.degrade import degrade
from ngt_ray.training.embeddings import embed_images
from ngt_ray.training.heads import fit_head
from ngt_ray.training.labelled import read_image_bytes

EVERYDAY = ("scenes", "everyday/", "caltech101/BACKGROUND_Google", "caltech101/Faces")
CROSS_SOURCES = ("weapons/firearm", "firearms", "caltech101/revolver")


def recall_at_fpr(labels: np.ndarray, scores: np.ndarray, fpr: float = 0.01) -> float:
    threshold = np.quantile(scores[labels == 0], 1 - fpr)
    return float((scores[labels == 1] > threshold).mean())


def interval(labels: np.ndarray, scores: np.ndarray, fn: Callable[[np.ndarray, np.ndarray], float],
             n: int = 1000, seed: int = 0) -> list[float]:
    """95 % bootstrap interval, positives and negatives resampled separately."""
    rng = np.random.default_rng(seed)
    pos, neg = np.flatnonzero(labels == 1), np.flatnonzero(labels == 0)
    values = [fn(labels[idx], scores[idx]) for idx in
              (np.concatenate([rng.choice(pos, len(pos)), rng.choice(neg, len(neg))]) for _ in range(n))]
    return [float(np.quantile(values, 0.025)), float(np.quantile(values, 0.975))]


def rate_interval(hits: np.ndarray, n: int = 1000, seed: int = 0) -> list[float]:
    """95 % bootstrap interval of a rate."""
    rng = np.random.default_rng(seed)
    values = [hits[rng.integers(0, len(hits), len(hits))].mean() for _ in range(n)]
    return [float(np.quantile(values, 0.025)), float(np.quantile(values, 0.975))]


class Manifest:
    """The manifest's columns as arrays."""

    def __init__(self, path: str) -> None:
        table = pacsv.read_csv(path, convert_options=pacsv.ConvertOptions(strings_can_be_null=False)).to_pydict()
        self.uris = [str(u) for u in table["uri"]]
        self.labels = np.array(table["label"], dtype=int)
        self.split = np.array(table["split"], dtype=str)
        self.source = np.array(table["source"], dtype=str)
        self.scene = np.array(table.get("scene", [""] * len(self.uris)), dtype=str)
        self.everyday = np.array([s.startswith(EVERYDAY) for s in self.source])


def judge(m: Manifest, split: str, scores: np.ndarray, threshold: float | None) -> dict:
    """The figures of one model on one split."""
    in_split = m.split == split
    pos = in_split & (m.labels == 1) & (m.scene == "in_scene")
    subsets = {"in_scene": pos | (in_split & (m.labels == 0) & m.everyday), "all": in_split}
    out: dict = {}
    for name, mask in subsets.items():
        y, s = m.labels[mask], scores[mask]
        out[name] = {"positives": int(y.sum()), "negatives": int((1 - y).sum()),
                     "auroc": roc_auc(y, s), "auroc_interval": interval(y, s, roc_auc),
                     "recall_at_1pct_fpr": recall_at_fpr(y, s), "recall_interval": interval(y, s, recall_at_fpr)}
    if threshold is not None:
        negatives = {"everyday": m.everyday, "caltech": np.char.startswith(m.source, "caltech101"),
                     "knife": m.source == "weapons/knife"}
        out["at_threshold"] = {"threshold": threshold,
                               "in_scene_recall": float((scores[pos] >= threshold).mean()),
                               "in_scene_recall_interval": rate_interval(scores[pos] >= threshold)}
        for name, kind in negatives.items():
            hits = scores[in_split & (m.labels == 0) & kind] >= threshold
            out["at_threshold"][f"fpr_{name}"] = float(hits.mean())
            out["at_threshold"][f"fpr_{name}_interval"] = rate_interval(hits)
            out["at_threshold"][f"{name}_negatives"] = len(hits)
    return out


def cross_source(m: Manifest, features: torch.Tensor, classes: list[int], backbone: str, split: str) -> dict:
    """Train without one positive source (its photos of every split), score it on its photos outside
    train; the zero-shot head's AUROC on the same photos beside it."""
    out = {}
    with torch.no_grad():
        zero_shot = zero_shot_head(backbone, classes)(features).squeeze(1).numpy()
    for held in CROSS_SOURCES:
        keep = m.source != held
        train, val = (m.split == "train") & keep, (m.split == "val") & keep
        head = build_head(backbone, {"kind": "imagenet-prior", "classes": classes})
        fit_head(head, (features[train], m.labels[train]), (features[val], m.labels[val]))
        with torch.no_grad():
            scores = head(features).squeeze(1).numpy()
        pos = (m.source == held) & (m.split != "train")
        mask = pos | ((m.split == split) & (m.labels == 0) & m.everyday)
        y, s = m.labels[mask], scores[mask]
        out[held] = {"positives": int(y.sum()), "negatives": int((1 - y).sum()),
                     "auroc": roc_auc(y, s), "auroc_interval": interval(y, s, roc_auc),
                     "recall_at_1pct_fpr": recall_at_fpr(y, s), "zero_shot_auroc": roc_auc(y, zero_shot[mask])}
    return out


def _row(name: str, r: dict) -> str:
    s, a = r["in_scene"], r["all"]
    t = r.get("at_threshold")
    tail = (f" {t['in_scene_recall']:>6.2f} {100 * t['fpr_everyday']:>5.1f} % "
            f"({100 * t['fpr_everyday_interval'][0]:.1f}-{100 * t['fpr_everyday_interval'][1]:.1f}) "
            f"{100 * t['fpr_caltech']:>5.1f} % {100 * t['fpr_knife']:>5.1f} %") if t else ""
    return (f"{name:<32} {s['auroc']:.3f} ({s['auroc_interval'][0]:.3f}-{s['auroc_interval'][1]:.3f}) "
            f"{s['recall_at_1pct_fpr']:.2f} ({s['recall_interval'][0]:.2f}-{s['recall_interval'][1]:.2f}) "
            f"{a['auroc']:.3f}{tail}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--manifest", required=True)
    parser.add_argument("--split", default="test")
    parser.add_argument("--models", nargs="+", required=True)
    parser.add_argument("--zero-shot", default="", help="ImageNet classes of the zero-shot floor, e.g. 413,763,764")
    parser.add_argument("--cross-source", action="store_true", help="also train without each positive source")
    parser.add_argument("--degraded", action="store_true",
                        help="also score degraded copies of the split (dark, blurred, grey, compressed: CCTV-like)")
    parser.add_argument("--output", default=None)
    args = parser.parse_args()
    m = Manifest(args.manifest)
    models = {Path(stem).name: load_checkpoint(stem) for stem in args.models}
    backbone = {(c.backbone, c.input_size) for _, c in models.values()}
    if len(backbone) != 1:
        raise SystemExit(f"these models do not share one backbone and size: {sorted(backbone)}")
    name, size = backbone.pop()
    frozen = build_backbone(name)
    pooled = GroupTestingModel(frozen, len(frozen), "cascade")  # its embed is the pooled features
    rows = np.flatnonzero((m.split == args.split) | (args.cross_source & np.isin(m.split, ["train", "val"])))
    features = torch.zeros(len(m.uris), frozen.spec.feature_dim)
    with torch.inference_mode():  # pooled features: the frozen backbone every individual model shares
        features[rows] = embed_images(pooled, [(m.uris[i], 0) for i in rows], size, 32,
                                      torch.device("cpu")).float()
    degraded = None
    if args.degraded:  # the same photos as a dark, soft, blocky camera would give them (seeded)
        rng = np.random.default_rng(7)
        split_rows = np.flatnonzero(m.split == args.split)
        copies = [(degrade(decode_image(read_image_bytes(m.uris[i]), size)[0].transpose(1, 2, 0), rng), 0)
                  for i in split_rows]
        degraded = features.clone()
        with torch.inference_mode():
            degraded[split_rows] = embed_images(pooled, copies, size, 32, torch.device("cpu")).float()
    classes = [int(c) for c in args.zero_shot.split(",") if c]
    heads = {stem: (model.head, card.threshold) for stem, (model, card) in models.items()}
    if classes:
        heads[f"zero-shot ImageNet {args.zero_shot}"] = (zero_shot_head(name, classes), None)
    results = {}
    print(f"{args.split} split: in-scene positives vs everyday negatives; then all; then at the model's threshold")
    print(f"{'model':<32} {'AUROC (95 %)':<21} {'recall@1%FPR':<17} {'all':<5} {'recall':>6} {'FPR everyday':>20} "
          f"{'Caltech':>7} {'knives':>7}")
    for stem, (head, threshold) in heads.items():
        with torch.no_grad():
            logits = head(features).squeeze(1)
        scores = torch.sigmoid(logits).numpy() if threshold is not None else logits.numpy()
        results[stem] = judge(m, args.split, scores, threshold)
        print(_row(stem, results[stem]))
        if degraded is not None:
            with torch.no_grad():
                logits = head(degraded).squeeze(1)
            scores = torch.sigmoid(logits).numpy() if threshold is not None else logits.numpy()
            results[stem]["degraded"] = judge(m, args.split, scores, threshold)
            print(_row("  degraded copies", results[stem]["degraded"]))
    report = {"manifest": args.manifest, "split": args.split, "results": results}
    if args.cross_source and classes:
        report["cross_source"] = cross_source(m, features, classes, name, args.split)
        print("cross-source: trained without the source, scored on its held-out photos vs everyday negatives")
        for held, r in report["cross_source"].items():
            lo, hi = r["auroc_interval"]
            print(f"  {held:<22} {r['positives']:>4} / {r['negatives']:<4} AUROC {r['auroc']:.3f} "
                  f"({lo:.3f}-{hi:.3f}) recall@1% {r['recall_at_1pct_fpr']:.2f}; zero-shot {r['zero_shot_auroc']:.3f}")
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
