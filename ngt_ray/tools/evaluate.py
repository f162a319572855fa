"""``ngt-ray evaluate``: designs x algorithms x group size x prevalence on held-out photos.

Every cell simulates a bucket from a held-out split, never trained or calibrated on (the ``test``
split of the labelled photos: Caltech-101's, a manifest's such as the firearm set's, or folders';
optionally with copy-paste composites: small firearms in real scenes): all negatives, positives planted at the
prevalence (fewer negatives where positives run out), random groups. The real screen model
scores every group test (on cached embeddings: the same numbers the job's actors compute) and the
real individual model confirms the candidates. Reported per cell,
averaged over trials: recall of planted positives and of those the individual model alone catches,
precision, false-positive rate, first-round group AUC, tests per image, and cost relative to the
individual model on every image, in MACs (flop_counter) and in measured seconds.

Writes ``results.parquet``, ``results.md`` and two PNG plots (relative cost vs prevalence with the
perfect-test references; recall vs k) to the output folder.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from ngt_ray.grouptesting.algorithms import ALGORITHMS, get_algorithm, screen
from ngt_ray.grouptesting.buckets import plant
from ngt_ray.grouptesting.calibration import ScreenQuality, roc_auc
from ngt_ray.grouptesting.cost_table import StageCosts, plan_sizes
from ngt_ray.grouptesting.planning import choose_group_size, expected_cost
from ngt_ray.nets.checkpoint import ModelCard, individual_model_for, load_checkpoint, packaged_screen_models
from ngt_ray.nets.profiling import stage_macs, stage_seconds
from ngt_ray.nets.runtime import pick_device
from ngt_ray.options import Common, Photos, option
from ngt_ray.training.copypaste import pasted_positives
from ngt_ray.training.embeddings import embed_images, score_cached_groups
from ngt_ray.training.labelled import SPLITS, LabelledImage, labelled_photos

log = logging.getLogger(__name__)

__all__ = ["EvaluationConfig", "dorfman_reference", "entropy_bound", "evaluate"]


@dataclass(frozen=True, kw_only=True)
class EvaluationConfig(Common, Photos):
    """The evaluation grid: which models, sizes, prevalences and algorithms, on which photos."""

    models: Sequence[str] | None = option(None, "screen checkpoint stems (default: every packaged one)", nargs="+")
    individual_model: str | None = option(None, "confirmation checkpoint stem (default: the packaged individual "
                                                "model of each screen's class)")
    output: Path = option(Path("docs/evaluation"), "folder for Parquet, markdown and PNG plots")
    split: str = option("test", "split the buckets are made of", choices=SPLITS)
    paste: int = option(0, "copy-paste positives added to the split from its own cut-outs and scenes (small "
                           "objects in real scenes; ngt_ray.training.copypaste)")
    sizes: Sequence[int] = option((2, 4, 8, 16, 32), "group sizes")
    prevalences: Sequence[float] = option((0.001, 0.005, 0.01, 0.05), "prevalences")
    algorithms: Sequence[str] = option(tuple(ALGORITHMS), "group-testing algorithms (default: every registered one)")
    population: int | None = option(None, "negatives per simulated bucket (default: all of the split)")
    trials: int = option(3, "buckets per cell (different positives and groups)")
    timing: bool = option(True, "time each stage and report relative seconds")
    batch: int = option(32, "images per embedding batch")

    def __post_init__(self) -> None:
        for name in self.algorithms:
            get_algorithm(name)  # raises, naming the registered ones


def entropy_bound(p: float) -> float:
    """Counting bound: tests per item of any scheme with perfect tests, H(p) bits."""
    return -(p * math.log2(p) + (1 - p) * math.log2(1 - p))


def dorfman_reference(p: float) -> float:
    """Two-round Dorfman with perfect tests at its best k: about 2 sqrt(p) tests per item."""
    return min(1 / k + 1 - (1 - p) ** k for k in range(1, 1001))


def _items(cfg: EvaluationConfig) -> tuple[list[LabelledImage], str]:
    """The split's labelled photos, and the composites made from them when asked; the set's name."""
    photos = labelled_photos(cfg)
    items: list[LabelledImage] = list(photos.split(cfg.split))
    if cfg.paste:
        made, used = pasted_positives(items, cfg.paste, np.random.default_rng([cfg.seed, 7]))
        log.info("%s split: %d composites from %d cut-outs and %d scenes", cfg.split, len(made), used["cut_outs"],
                 used["scenes"])
        items = items + made
    return items, photos.name


def _bucket(labels: np.ndarray, p: float, population: int | None, rng: np.random.Generator) -> np.ndarray:
    """Indices of a bucket at prevalence ``p``: negatives plus planted positives, shuffled."""
    return rng.permutation(np.concatenate(plant(labels, p, rng, negatives=population)))


def _cell(algorithm: str, k: int, bucket: np.ndarray, labels: np.ndarray, individual_flag: np.ndarray,
          embedded: torch.Tensor, model, card, macs: StageCosts, seconds: StageCosts | None,
          rng: np.random.Generator, device: torch.device, memo: dict[tuple, float]) -> dict:
    truth = labels[bucket] == 1

    def scorer(groups: list[np.ndarray]) -> np.ndarray:
        # algorithms share their first-round groups: score each distinct group once per bucket
        keys = [tuple(bucket[g].tolist()) for g in groups]
        todo = list(dict.fromkeys(key for key in keys if key not in memo))
        if todo:
            scores = torch.sigmoid(score_cached_groups(model, embedded, todo, device)).numpy()
            memo.update(zip(todo, scores.tolist()))
        return np.array([memo[key] for key in keys])

    result = screen(algorithm, len(bucket), k, rng, scorer, card.threshold_for)
    confirmed = result.candidate.copy()
    flagged = confirmed & individual_flag[bucket]
    n, n_conf = len(bucket), int(confirmed.sum())
    group_truth = np.array([truth[g].any() for g in result.groups])
    group_scores = np.array([result.group_score[g[0]] for g in result.groups])
    caught_by_individual = individual_flag[bucket] & truth
    row = {
        "images": n,
        "positives": int(truth.sum()),
        "recall": float(flagged[truth].mean()),
        "recall_of_individual": float(flagged[caught_by_individual].mean()) if caught_by_individual.any() else 1.0,
        "precision": float(truth[flagged].mean()) if flagged.any() else 1.0,
        "false_positive_rate": float(flagged[~truth].mean()),
        "group_auc": roc_auc(group_truth, group_scores),
        "group_tests": result.n_tests,
        "confirmations": n_conf,
        "rounds": result.rounds + (1 if n_conf else 0),
        "tests_per_image": (result.n_tests + n_conf) / n,
        "relative_macs": (n * macs.embed + result.cost(macs.group_cost).sum() + n_conf * macs.confirm)
        / (n * macs.confirm),
    }
    row["relative_time"] = (
        (n * seconds.embed + result.cost(seconds.group_cost).sum() + n_conf * seconds.confirm) / (n * seconds.confirm)
        if seconds else math.nan
    )
    return row


def evaluate(cfg: EvaluationConfig) -> pa.Table:
    """Run every cell, write the Parquet table, markdown and plots, and return the table."""
    device = pick_device(cfg.device)
    items, photos = _items(cfg)
    labels = np.array([label for _, label in items])
    # The buckets first, so only photos some bucket uses are embedded (all of them at full size).
    buckets = {(p, t): _bucket(labels, p, cfg.population, np.random.default_rng([cfg.seed, t, round(p * 1e6)]))
               for p in cfg.prevalences for t in range(cfg.trials)}
    used = np.unique(np.concatenate(list(buckets.values())))
    items, labels = [items[i] for i in used], labels[used]
    buckets = {key: np.searchsorted(used, b) for key, b in buckets.items()}
    confirmations: dict[str, tuple] = {}  # per individual model: it, its card, its flag per image

    def confirmation(stem: str) -> tuple:
        if stem not in confirmations:
            individual, individual_card = load_checkpoint(stem, map_location=device)
            log.info("individual model %s on %d %s images", Path(stem).name, len(items), cfg.split)
            emb = embed_images(individual, items, individual_card.input_size, cfg.batch, device)
            scores = torch.sigmoid(score_cached_groups(individual, emb, [[i] for i in range(len(items))],
                                                       device)).numpy()
            confirmations[stem] = (individual, individual_card, scores >= individual_card.threshold)
        return confirmations[stem]

    rows, screens = [], []
    for stem in cfg.models or packaged_screen_models():
        model, card = load_checkpoint(stem, map_location=device)
        if card.design == "individual":
            continue
        individual, individual_card, individual_flag = confirmation(
            cfg.individual_model or str(individual_model_for(card)))
        # the grid's sizes and the calibrated ones (the planner's), counted once
        sizes = plan_sizes(sorted({*cfg.sizes, *card.calibrated_sizes}))
        macs = stage_macs(model, individual, card.input_size, individual_card.input_size, sizes)
        screens.append(screen_rows(Path(stem).name, card, macs, cfg.algorithms[0], cfg.prevalences))
        seconds = (stage_seconds(model, individual, card.input_size, individual_card.input_size,
                                 plan_sizes(cfg.sizes), device)
                   if cfg.timing else None)
        model, individual = model.to(device), individual.to(device)
        log.info("%s: embedding %d images at %d px", Path(stem).name, len(items), card.input_size)
        embedded = embed_images(model, items, card.input_size, cfg.batch, device)
        memos: dict[tuple, dict] = {key: {} for key in buckets}
        for p in cfg.prevalences:
            for k in cfg.sizes:
                for algorithm in cfg.algorithms:
                    trials = []
                    for t in range(cfg.trials):
                        bucket = buckets[(p, t)]
                        rng = np.random.default_rng([cfg.seed, t, k])  # same groups for every algorithm
                        trials.append(_cell(algorithm, k, bucket, labels, individual_flag, embedded, model, card,
                                            macs, seconds, rng, device, memos[(p, t)]))
                    row = {key: float(np.nanmean([r[key] for r in trials])) for key in trials[0]}
                    row.update(model=Path(stem).name, design=card.design, algorithm=algorithm, k=k, prevalence=p,
                               trials=cfg.trials, timing_device=device.type if seconds else "")
                    rows.append(row)
                    log.info("%s %s k=%d p=%.3f: recall %.2f, relative MACs %.3f, time %.3f", card.design,
                             algorithm, k, p, row["recall"], row["relative_macs"], row["relative_time"])
        table = _write(rows, cfg, photos)  # after every model, so a long run keeps what it has measured
    if not rows:
        raise ValueError("no screen models to evaluate (individual models have no group test)")
    report = calibration_markdown(screens, cfg.prevalences)
    (cfg.output / "screens.md").write_text(report + "\n")
    print(report)
    print(_markdown(table, cfg, photos, best_only=True))
    return table


def screen_rows(name: str, card: ModelCard, macs: StageCosts, algorithm: str,
                prevalences: Sequence[float]) -> dict:
    """What sets a screen's saving, from its card: per calibrated size the negative-group pass rate
    at recall 0.9 / 0.95 / 0.99 of positive groups (95 % bootstrap intervals) and AUC, and the
    planner's predicted compute_saving at each prevalence (its best k)."""
    rates = card.validation.get("calibration", {}).get("pass_rates", {})
    quality = ScreenQuality.from_card(card.calibration)
    saving = {}
    for p in prevalences:
        k = choose_group_size(algorithm, card.calibrated_sizes, p, macs, quality)
        saving[p] = (k, 1.0 - expected_cost(algorithm, k, p, macs, quality) / macs.confirm)
    return {"model": name, "design": card.design, "input_size": card.input_size, "rates": rates,
            "auc": {k: row.auc for k, row in card.calibration.items()}, "saving": saving,
            "per_image": macs.embed / macs.confirm}


def calibration_markdown(screens: list[dict], prevalences: Sequence[float]) -> str:
    """The screens side by side: pass rates with intervals per size, and the planned saving."""
    lines = ["| screen | per image | k | AUC | pass @ recall 0.9 | 0.95 | 0.99 |", "|---|---|---|---|---|---|---|"]
    for s in screens:
        for k, auc in sorted(s["auc"].items()):
            r = s["rates"].get(str(k), {})
            cells = [f"{v[0]:.2f} ({v[1]:.2f}-{v[2]:.2f})" if v else "-" for v in (r.get(t) for t in ("0.9", "0.95",
                                                                                                          "0.99"))]
            lines.append(f"| {s['model']} | {s['per_image']:.3f} | {k} | {auc:.3f} | " + " | ".join(cells) + " |")
    lines += ["", "| screen | " + " | ".join(f"planned saving at {100 * p:g} % (k)" for p in prevalences) + " |",
              "|---|" + "---|" * len(prevalences)]
    for s in screens:
        lines.append(f"| {s['model']} | " + " | ".join(f"{v:.2f} ({k})" for k, v in s["saving"].values()) + " |")
    return "\n".join(lines)


def _write(rows: list[dict], cfg: EvaluationConfig, photos: str) -> pa.Table:
    table = pa.Table.from_pylist(rows)
    cfg.output.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, cfg.output / "results.parquet")
    (cfg.output / "results.md").write_text(_markdown(table, cfg, photos))
    _plots(table, cfg.output)
    return table


def _markdown(table: pa.Table, cfg: EvaluationConfig, photos: str, best_only: bool = False) -> str:
    rows = table.to_pylist()
    if best_only:  # per model, algorithm and prevalence: the cheapest k
        best: dict[tuple, dict] = {}
        for r in rows:
            key = (r["model"], r["algorithm"], r["prevalence"])
            if key not in best or r["relative_macs"] < best[key]["relative_macs"]:
                best[key] = r
        rows = list(best.values())
    head = ("| model | algorithm | k | prevalence | recall | recall of individual | precision | FPR | group AUC "
            "| tests/image | rel. MACs | rel. time |\n|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n")
    body = "".join(
        f"| {r['model']} | {r['algorithm']} | {r['k']} | {r['prevalence']:.3%} | {r['recall']:.3f} "
        f"| {r['recall_of_individual']:.3f} | {r['precision']:.3f} | {r['false_positive_rate']:.4f} "
        f"| {r['group_auc']:.3f} | {r['tests_per_image']:.3f} | {r['relative_macs']:.3f} | {r['relative_time']:.3f} |\n"
        for r in rows
    )
    title = "cheapest k per model, algorithm and prevalence" if best_only else "every cell"
    pasted = f" plus {cfg.paste} copy-paste positives" if cfg.paste else ""
    return (f"# ngt-ray evaluate: {title}\n\n`{photos}` `{cfg.split}` split{pasted}, {cfg.trials} trials per cell; "
            f"relative = cost / (individual model on every image).\n\n{head}{body}")


def _plots(table: pa.Table, output: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    df = table.to_pandas()
    grid = np.logspace(-3.2, math.log10(0.06), 60)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for (design, algorithm), part in df.groupby(["design", "algorithm"]):
        best = part.loc[part.groupby("prevalence")["relative_macs"].idxmin()].sort_values("prevalence")
        line, = axes[0].plot(best["prevalence"], best["relative_macs"], "o-", label=f"{design} / {algorithm} (MACs)")
        if best["relative_time"].notna().any():
            axes[0].plot(best["prevalence"], best["relative_time"], "s--", color=line.get_color(), alpha=0.6,
                         label=f"{design} / {algorithm} (time)")
        recall = part.groupby("k")["recall"].mean()
        axes[1].plot(recall.index, recall.values, "o-", label=f"{design} / {algorithm}")
    axes[0].plot(grid, [2 * math.sqrt(p) for p in grid], "k:", label="Dorfman 2√p (perfect tests)")
    axes[0].plot(grid, [entropy_bound(p) for p in grid], "k-.", label="counting bound H(p)")
    axes[0].axhline(1.0, color="grey", lw=0.8)
    axes[0].set(xscale="log", yscale="log", xlabel="prevalence", ylabel="cost relative to individual testing",
                title="Cost at the cheapest k")
    axes[0].legend(fontsize=7)
    axes[1].set(xscale="log", xlabel="group size k", ylabel="recall (mean over prevalences)", title="Recall vs k",
                ylim=(0, 1.05))
    axes[1].minorticks_off()
    axes[1].set_xticks(sorted(df["k"].unique()), labels=[str(k) for k in sorted(df["k"].unique())])
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(output / "evaluation.png", dpi=120)
    plt.close(fig)
