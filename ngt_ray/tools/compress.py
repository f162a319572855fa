"""``ngt-ray compress``: a screen checkpoint in, a smaller one that misses no more positives out.

    original --(prune channels, fine-tune)*--> --(linearise one activation, fine-tune)*-->
             re-calibrate every group size --> checkpoint + report

Every step is judged against the original model on held-out validation groups
(``ngt_ray.training.acceptance``); the first rejected step is undone and ends its phase. Fine-tuning
distils from the original model on cached embeddings, so each step costs only the shared stages.
The per-image stages before the first merge are left as they are: they are frozen ImageNet
stages whose output is what the job caches, and pruning them would not change the group tests.
The report has, per step, parameters, MACs, latency per batch on the device at hand (with the
``fast`` runtime levers), false negatives and positives, recall and AUC.
"""

from __future__ import annotations

import copy
import json
import logging
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ngt_ray.grouptesting.calibration import calibrate_scores
from ngt_ray.nets.checkpoint import ModelCard, load_checkpoint, save_checkpoint
from ngt_ray.nets.fold import fold_batchnorm
from ngt_ray.nets.model import GroupTestingModel, gather
from ngt_ray.nets.profiling import profile_screen
from ngt_ray.nets.runtime import pick_device
from ngt_ray.nets.surgery import linearise
from ngt_ray.options import option
from ngt_ray.tools.calibrate import FittingOptions, calibrate_sizes
from ngt_ray.training.acceptance import Verdict, judge
from ngt_ray.training.easier import activation_entropy
from ngt_ray.training.embeddings import (
    embed_images,
    hard_negative_weights,
    sample_groups,
    score_cached_groups,
    subsample_negatives,
    training_embeddings,
)
from ngt_ray.training.finetune import FinetuneConfig, finetune_groups, group_loss
from ngt_ray.training.labelled import labelled_photos
from ngt_ray.training.pruning import channel_pruner

log = logging.getLogger(__name__)

__all__ = ["CompressConfig", "Holdout", "compress", "write_report"]


@dataclass(frozen=True, kw_only=True)
class CompressConfig(FittingOptions):
    """One compression run; the defaults are the run behind the packaged compressed screen."""

    model: Path = option(help="screen checkpoint stem to compress")
    output: Path = option(help="stem of the compressed checkpoint")
    prune_ratio: float = option(0.25, "share of the shared stages' channels to remove, over --prune-steps")
    prune_steps: int = option(2, "pruning steps, each fine-tuned and judged")
    global_ranking: bool = option(True, "rank channels across layers (without: every layer loses the same share)")
    easier_steps: int = option(1, "activations EASIER tries to linearise")
    finetune_steps: int = option(250, "distillation steps after each pruning step (EASIER steps take half)")
    groups_per_step: int = option(16, "groups per fine-tuning step")
    pos_weight: float = option(4.0, "weight of positive groups in the Taylor and fine-tuning losses")
    acceptance_sizes: tuple[int, ...] = option((2, 4, 8), "group sizes of the held-out judge")
    acceptance_groups: int = option(300, "held-out groups per size, once to calibrate and once to judge")
    latency_batch: int | None = option(None, "images per timed batch (default: 256 on a GPU, 32 on a CPU)")
    report: Path | None = option(None, "stem of the JSON + markdown report (default: <output>-report)")


class Holdout:
    """Fixed validation groups per size: one set calibrates each model's threshold, the other is
    judged at it, so the false negatives counted are not the ones the threshold was fitted to."""

    def __init__(self, embedded: torch.Tensor, labels: np.ndarray, sizes: tuple[int, ...], n: int, seed: int,
                 target_recall: float) -> None:
        rng = np.random.default_rng(seed)
        self.embedded, self.target_recall = embedded, target_recall
        self.calibration = {k: sample_groups(labels, k, n, rng) for k in sizes}
        self.judged = {k: sample_groups(labels, k, n, rng) for k in sizes}
        self.truth = {k: np.array([labels[g].any() for g in gs]) for k, gs in self.calibration.items()}
        self.labels = np.concatenate([np.array([labels[g].any() for g in gs]) for gs in self.judged.values()])

    def run(self, model: GroupTestingModel, device: torch.device) -> tuple[np.ndarray, np.ndarray]:
        """Scores of every judged group, and whether each passes its size's re-calibrated threshold."""
        scores, passed = [], []
        for k in self.judged:
            cal = torch.sigmoid(score_cached_groups(model, self.embedded, self.calibration[k], device)).numpy()
            threshold = calibrate_scores(self.truth[k], cal, self.target_recall).threshold
            s = torch.sigmoid(score_cached_groups(model, self.embedded, self.judged[k], device)).numpy()
            scores.append(s)
            passed.append(s >= threshold)
        return np.concatenate(scores), np.concatenate(passed)


def _plain(table: dict) -> dict:
    """A calibration table as JSON-ready dicts."""
    return {str(size): asdict(row) for size, row in table.items()}


@dataclass
class _Run:
    """One compression run's fixed parts: the original (teacher) model, the cached embeddings it
    fine-tunes and calibrates on, and the held-out judge."""

    cfg: CompressConfig
    device: torch.device
    rng: np.random.Generator
    teacher: GroupTestingModel
    card: ModelCard
    photos: str  # the labelled set's name, for the calibration record
    embedded: torch.Tensor  # train photos, positives mirrored
    labels: np.ndarray
    weights: np.ndarray  # hard-negative sampling weights from the teacher's scores
    val_embedded: torch.Tensor
    val_labels: np.ndarray
    holdout: Holdout
    reference: tuple[np.ndarray, np.ndarray]  # the teacher's scores and passes on the judged groups
    latency_batch: int

    @property
    def k(self) -> int:
        return self.card.group_size

    def assess(self, model: GroupTestingModel) -> Verdict:
        scores, passed = self.holdout.run(model, self.device)
        return judge(self.holdout.labels, self.reference[0], self.reference[1], scores, passed,
                     np.random.default_rng(self.cfg.seed))

    def tune(self, model: GroupTestingModel, steps: int) -> None:
        """Distil from the teacher on groups of the cached train embeddings."""
        finetune_groups(model, self.embedded, self.labels, self.weights,
                        FinetuneConfig(self.k, steps, model.merge_at, self.cfg.groups_per_step, lr=3e-4,
                                       pos_weight=self.cfg.pos_weight), self.rng, self.device, teacher=self.teacher)

    def row(self, step: str, model: GroupTestingModel, verdict: Verdict | None, seconds: float,
            card: ModelCard | None = None) -> dict[str, Any]:
        """A report row: the model's size and latency, and the judge's verdict."""
        card = card or self.card
        profile = profile_screen(model, card.input_size, card.group_size, self.device, self.latency_batch)
        row: dict[str, Any] = {"step": step, **profile, "step_seconds": round(seconds, 1)}
        if verdict is not None:
            row.update(accepted=verdict.accepted, reason=verdict.reason, false_negatives=verdict.false_negatives,
                       false_positives=verdict.false_positives,
                       recall=1 - verdict.false_negatives / int(self.holdout.labels.sum()),
                       auc=verdict.auc, reference_false_negatives=verdict.reference_false_negatives,
                       reference_auc=verdict.reference_auc, fn_delta_interval=list(verdict.fn_delta_interval),
                       auc_delta_interval=list(verdict.auc_delta_interval))
        log.info("%s: %s", step, {k: v for k, v in row.items() if not isinstance(v, list)})
        return row


def _taylor_gradients(model: GroupTestingModel, embedded: torch.Tensor, labels: np.ndarray, weights: np.ndarray,
                      k: int, groups: int, pos_weight: float, rng: np.random.Generator, device: torch.device,
                      batches: int = 4) -> None:
    """Accumulate gradients of the positive-weighted group loss: what Taylor importance reads."""
    model.zero_grad(set_to_none=True)
    for _ in range(batches):
        chosen = sample_groups(labels, k, groups, rng, negative_weights=weights)
        y = torch.tensor([float(labels[g].any()) for g in chosen], device=device)
        logits = model.score_groups(gather(embedded, chosen, device), [len(g) for g in chosen])
        (group_loss(logits, y, pos_weight) / batches).backward()


def compress(cfg: CompressConfig) -> dict[str, Any]:
    """Compress ``cfg.model``, write the accepted model to ``cfg.output`` and return the report."""
    start = time.perf_counter()
    report_stem = _report_stem(cfg)
    run = _prepare(cfg)
    steps = [run.row("original", run.teacher, run.assess(run.teacher), 0.0)]
    student = copy.deepcopy(run.teacher)
    for p in student.parameters():
        p.requires_grad_(True)
    student = _prune(run, student, steps)
    student, identity = _linearise(run, student, steps)
    card, folded = _save(run, student, steps, identity)
    final = run.row("compressed (saved)", student, run.assess(student), 0.0, card)
    report = {
        "model": Path(cfg.model).name, "output": Path(cfg.output).name, "device": run.device.type,
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(cfg).items()},
        "steps": steps, "final": final, "folded_batchnorms": folded, "calibration": _plain(card.calibration),
        "original_calibration": _plain(run.card.calibration), "seconds": round(time.perf_counter() - start, 1),
    }
    write_report(report, report_stem)
    return report


def _report_stem(cfg: CompressConfig) -> Path:
    """Where the report goes: ``--report``, or beside the output; never over the checkpoint's card."""
    report_stem = Path(cfg.report or f"{Path(cfg.output).with_suffix('')}-report").with_suffix("")
    if report_stem == Path(cfg.output).with_suffix(""):
        raise ValueError(f"the report {report_stem}.json would overwrite the checkpoint's card; "
                         "choose another --report")
    return report_stem


def _prepare(cfg: CompressConfig) -> _Run:
    """Load the original model and embed the labelled train and val photos once with it."""
    device = pick_device(cfg.device)
    rng = np.random.default_rng(cfg.seed)
    torch.manual_seed(cfg.seed)
    teacher, card = load_checkpoint(cfg.model, map_location=device)
    if card.design == "individual":
        raise ValueError(f"{cfg.model} is an individual model; compress a screen (group) model")
    for p in teacher.parameters():
        p.requires_grad_(False)
    photos = labelled_photos(cfg)
    log.info("embedding train and val photos of %s at %d px", photos.name, card.input_size)
    train_items = subsample_negatives(photos.split("train"), cfg.max_negatives, rng)
    embedded, labels, _ = training_embeddings(teacher, train_items, card.input_size, cfg.batch_size, device)
    singles = torch.sigmoid(score_cached_groups(teacher, embedded, [[i] for i in range(len(labels))], device))
    weights = hard_negative_weights(singles.numpy(), labels, cfg.hard_negative_fraction)
    val_items = subsample_negatives(photos.split("val"), cfg.max_negatives, rng)
    val_labels = np.array([label for _, label in val_items])
    val_embedded = embed_images(teacher, val_items, card.input_size, cfg.batch_size, device)
    holdout = Holdout(val_embedded, val_labels, cfg.acceptance_sizes, cfg.acceptance_groups, cfg.seed + 1,
                      cfg.target_recall)
    return _Run(cfg=cfg, device=device, rng=rng, teacher=teacher, card=card, photos=photos.name, embedded=embedded,
                labels=labels, weights=weights, val_embedded=val_embedded, val_labels=val_labels, holdout=holdout,
                reference=holdout.run(teacher, device),
                latency_batch=cfg.latency_batch or (256 if device.type == "cuda" else 32))


def _prune(run: _Run, student: GroupTestingModel, steps: list[dict[str, Any]]) -> GroupTestingModel:
    """Remove channels of the shared stages step by step, each fine-tuned and judged; the first
    rejected step is undone and ends the phase. Appends a report row per step."""
    cfg = run.cfg
    if not cfg.prune_steps or cfg.prune_ratio <= 0:
        return student
    pruner = channel_pruner(student, gather(run.embedded, [[0, 1]], run.device), cfg.prune_ratio, cfg.prune_steps,
                            global_ranking=cfg.global_ranking)
    for i in range(cfg.prune_steps):
        t0, previous = time.perf_counter(), copy.deepcopy(student)
        _taylor_gradients(student, run.embedded, run.labels, run.weights, run.k, cfg.groups_per_step,
                          cfg.pos_weight, run.rng, run.device)
        pruner.step()
        student.zero_grad(set_to_none=True)
        run.tune(student, cfg.finetune_steps)
        verdict = run.assess(student)
        steps.append(run.row(f"prune {i + 1}/{cfg.prune_steps}", student, verdict, time.perf_counter() - t0))
        if not verdict.accepted:
            return previous
    return student


def _linearise(run: _Run, student: GroupTestingModel,
               steps: list[dict[str, Any]]) -> tuple[GroupTestingModel, list[str]]:
    """EASIER: replace the activation of lowest entropy by the identity, fine-tune and judge, up to
    ``easier_steps`` times; the first rejected step is undone and ends the phase. Returns the
    model and the activations it linearised."""
    identity: list[str] = []
    for _ in range(run.cfg.easier_steps):
        t0 = time.perf_counter()
        groups = sample_groups(run.labels, run.k, 256, run.rng, negative_weights=run.weights)
        entropy = activation_entropy(student, run.embedded, run.labels, groups, run.device)
        if not entropy:
            break
        name = min(entropy, key=lambda n: entropy[n]["score"])
        previous = copy.deepcopy(student)
        linearise(student, [name])
        run.tune(student, max(1, run.cfg.finetune_steps // 2))
        verdict = run.assess(student)
        row = run.row(f"linearise {name}", student, verdict, time.perf_counter() - t0)
        row["entropy_bits"] = entropy[name]
        steps.append(row)
        if not verdict.accepted:
            return previous, identity
        identity.append(name)
    return student, identity


def _save(run: _Run, student: GroupTestingModel, steps: list[dict[str, Any]],
          identity: list[str]) -> tuple[ModelCard, int]:
    """Check the batch-norm folds are exact, re-calibrate every group size on val and write the
    checkpoint. Returns its card and the number of folded batch norms."""
    cfg, card = run.cfg, run.card
    student.eval()
    macs = [s["macs_per_image"] for s in steps]
    shared_keys = student.shared_state_keys()
    example = torch.randint(0, 256, (2, 3, card.input_size, card.input_size), dtype=torch.uint8, device=run.device)
    _, folded = fold_batchnorm(student, example)  # raises if not exact
    compressed = replace(
        card,
        architecture={"pruned": True, "identity": identity},
        compression={"from": Path(cfg.model).name, "prune_ratio": cfg.prune_ratio,
                     "accepted_steps": [s["step"] for s in steps[1:] if s["accepted"]],
                     "macs_per_image": macs[-1], "original_macs_per_image": macs[0],
                     "shared_params": steps[-1]["shared_params"], "original_shared_params": steps[0]["shared_params"],
                     "target_recall": cfg.target_recall},
    )
    calibrated = calibrate_sizes(student, compressed, run.val_embedded, run.val_labels, cfg.calibration_sizes,
                                 cfg.target_recall, cfg.val_groups, cfg.seed, run.device, split=f"{run.photos} val")
    save_checkpoint(student, calibrated, cfg.output, shared_keys)
    return calibrated, folded


def write_report(report: dict[str, Any], stem: Path) -> None:
    """``<stem>.json`` (everything) and ``<stem>.md`` (one table row per step)."""
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2, default=float) + "\n")
    k = next(key.rsplit("_k", 1)[1] for key in report["final"] if key.startswith("macs_group_test_k"))
    lines = [
        f"# Compression of `{report['model']}` -> `{report['output']}`", "",
        (f"Latency per batch of {report['final']['latency_batch']} on {report['final']['latency_device']} with the "
        "`fast` runtime (batch norm folded). FN/FP: held-out validation groups of sizes "
        f"{report['config']['acceptance_sizes']} at each model's re-calibrated threshold "
        f"(target recall {report['config']['target_recall']})."), "",
        (f"| step | kept | shared params | MACs/image | MACs/test (k={k}) | screen ms | group-test ms | FN | FP | "
        "recall | AUC | ΔFN 95% | ΔAUC 95% |"),
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in [*report["steps"], report["final"]]:
        fn_i, auc_i = s.get("fn_delta_interval", ["", ""]), s.get("auc_delta_interval", ["", ""])
        lines.append(
            f"| {s['step']} | {'yes' if s.get('accepted', True) else 'no: ' + s['reason']} | "
            f"{s['shared_params'] / 1e6:.2f} M | {s['macs_per_image'] / 1e6:.0f} M | "
            f"{s[f'macs_group_test_k{k}'] / 1e6:.0f} M | {s['screen_ms_per_batch']:.1f} | "
            f"{s[f'group_tests_ms_per_batch_k{k}']:.1f} | {s.get('false_negatives', '')} | "
            f"{s.get('false_positives', '')} | {s.get('recall', float('nan')):.3f} | "
            f"{s.get('auc', float('nan')):.3f} | "
            + (f"{fn_i[0]:+.0f}..{fn_i[1]:+.0f} | {auc_i[0]:+.3f}..{auc_i[1]:+.3f} |" if auc_i[0] != "" else " | |")
        )
    lines += ["", (f"{report['folded_batchnorms']} batch norms fold exactly (checked in float64). "
              f"Run took {report['seconds']:.0f} s."), ""]
    stem.with_suffix(".md").write_text("\n".join(lines))
