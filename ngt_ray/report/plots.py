"""The report's three plots, as small PNGs (matplotlib, drawn off-screen).

* ``scores``: the score histograms of the rows the screen decided and the rows the individual
  model scored, with each threshold marked: how far the run's images sat from being flagged;
* ``phases``: where the model actors' time went, phase by phase, grouped as the job's stages
  (read, decode, screen, confirm, write);
* ``rounds``: what each round of the algorithm decided and what it cost: images cleared by the first
  group tests, by the retests of smaller groups, and scored by the individual model, beside the
  seconds the screen's per-image stages (``embed``), each round and the confirmation took.
"""

from __future__ import annotations

import io
from typing import Any

import matplotlib

matplotlib.use("Agg")  # no display, and no GUI toolkit imported
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

from ngt_ray.job.phases import PHASES  # noqa: E402
from ngt_ray.report.results import SCORE_BINS, RunResults  # noqa: E402

__all__ = ["STAGE_OF_PHASE", "plot_all"]

# the job's stages, and the actor phases that make them up (ngt_ray.job.phases)
STAGE_OF_PHASE = {"wait": "read", "decode": "decode", "to_device": "decode", "embed": "screen",
                  "round_1": "screen", "round_2": "screen", "round_3": "screen", "round_4plus": "screen",
                  "bookkeeping": "screen", "confirm": "confirm", "output": "write"}
_STAGE_COLOURS = {"read": "#8c8c8c", "decode": "#4c72b0", "screen": "#55a868", "confirm": "#c44e52",
                  "write": "#8172b2"}
_DPI = 96


def plot_all(results: RunResults) -> dict[str, bytes]:
    """``{name: PNG bytes}`` for ``scores``, ``phases`` and ``rounds``."""
    return {"scores": _png(_scores(results)), "phases": _png(_phases(results.stats)),
            "rounds": _png(_rounds(results))}


def _png(fig: plt.Figure) -> bytes:
    out = io.BytesIO()
    fig.savefig(out, format="png", dpi=_DPI, bbox_inches="tight")
    plt.close(fig)
    return out.getvalue()


def _scores(results: RunResults) -> plt.Figure:
    fig, ax = plt.subplots(figsize=(6.4, 3.2))
    width = np.diff(SCORE_BINS)
    for name, label, colour in (("screen", "decided by the screen (group tests)", "#55a868"),
                                ("individual", "scored by the individual model", "#c44e52")):
        counts = results.histograms[name]
        ax.bar(SCORE_BINS[:-1], counts, width=width, align="edge", alpha=0.6, color=colour,
               label=f"{label}: {int(counts.sum())}")
    stats = results.stats
    for key, label, colour in (("group_threshold", "group threshold", "#2d6b3c"),
                               ("individual_threshold", "individual threshold", "#7a1f22")):
        value = stats.get(key)
        if value is not None and np.isfinite(value):
            ax.axvline(value, color=colour, linestyle="--", linewidth=1.2, label=f"{label} {value:.3f}")
    ax.set_yscale("symlog", linthresh=1)
    ax.set_xlim(0, 1)
    ax.set_xlabel("score (the test that decided the image)")
    ax.set_ylabel("images")
    ax.set_title("Scores")
    ax.legend(fontsize=7, loc="upper center")
    return fig


def _phases(stats: dict[str, Any]) -> plt.Figure:
    fig, ax = plt.subplots(figsize=(6.4, 3.2))
    names = [name for name in PHASES if stats.get(f"seconds_{name}")]
    seconds = [float(stats[f"seconds_{name}"]) for name in names]
    if stats.get("seconds_decode_tasks"):  # CPU decode runs in tasks, outside the actors
        names.append("decode_tasks")
        seconds.append(float(stats["seconds_decode_tasks"]))
    stages = [STAGE_OF_PHASE.get(name, "decode") for name in names]
    ax.barh(names[::-1], seconds[::-1], color=[_STAGE_COLOURS[s] for s in stages[::-1]])
    ax.set_xlabel("seconds, summed over actors")
    total = sum(seconds)
    ax.set_title(f"Where the time went ({total:.1f} actor-seconds; wall {stats.get('wall_seconds', 0):.1f} s)")
    if names:
        ax.legend(handles=[Patch(color=colour, label=stage) for stage, colour in _STAGE_COLOURS.items()
                           if stage in stages], fontsize=7, loc="lower right")
    return fig


def _rounds(results: RunResults) -> plt.Figure:
    stats, decided = results.stats, results.decided
    fig, (left, right) = plt.subplots(1, 2, figsize=(6.4, 3.0))
    steps = [("round 1\ncleared", decided.get("group", 0)), ("retests\ncleared", decided.get("subgroup", 0)),
             ("individual\nmodel", decided.get("retest", 0))]
    left.bar([name for name, _ in steps], [n for _, n in steps], color=["#55a868", "#8fc79b", "#c44e52"])
    left.set_ylabel("images")
    left.set_title("Where images were decided", fontsize=9)
    # embed: the screen's per-image early stages, paid once per image before any group is merged
    rounds = [name for name in ("embed", "round_1", "round_2", "round_3", "round_4plus", "confirm")
              if stats.get(f"seconds_{name}")]
    right.bar([name.replace("_", " ") for name in rounds], [float(stats[f"seconds_{name}"]) for name in rounds],
              color=["#c44e52" if name == "confirm" else "#55a868" for name in rounds])
    right.set_ylabel("actor-seconds")
    right.set_title("What each round cost", fontsize=9)
    right.tick_params(axis="x", labelsize=7)
    left.tick_params(axis="x", labelsize=7)
    saving = stats.get("compute_saving", 0.0)
    fig.suptitle(f"Saving per round: compute saving {saving:.1%} against the individual model on every image",
                 fontsize=9)
    fig.tight_layout()
    return fig
