"""What a review report costs beside the run it reports on, and how large its page gets.

    python jobs/report_cost.py --workdir /tmp/report-cost            # 3,000 Caltech photos, 1 % planted
    python jobs/report_cost.py --workdir /tmp/rc --images 300        # a quick look

One run of ``ngt-ray moderate`` with the default models over a local bucket of real photos (Caltech-101's
train split: this measures cost, not recall), then, in the same process and on the same Ray:

* ``default``: ``build_report`` as ``moderate --report`` calls it (at most 500 flagged thumbnails,
  24 near the threshold), against the run's wall time (the target: under 10 %);
* ``rebuilt``: the same again, every thumbnail already there (made once);
* ``500 + 500``: ``--max-thumbnails 500 --near-threshold 500``, so the page carries at least 500
  thumbnails whatever the run flagged (past ``LOCAL_LIMIT`` they are made in Ray tasks): the page's
  size with 500 thumbnails (the target: under 5 MB).

Prints a table and writes ``docs/benchmarks/report-cost.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import time
from pathlib import Path

from ngt_ray.job.pipeline import ModerationConfig, init_ray, run_moderation
from ngt_ray.options import shared_data_root
from ngt_ray.report import build_report
from ngt_ray.tools.demo import build_bucket

_OUT = Path(__file__).resolve().parent.parent / "docs" / "benchmarks" / "report-cost.json"


def _size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--images", type=int, default=3000)
    parser.add_argument("--prevalence", type=float, default=0.01)
    parser.add_argument("--json", type=Path, default=_OUT)
    args = parser.parse_args()

    negatives = round(args.images * (1 - args.prevalence))
    bucket = build_bucket(shared_data_root() / "caltech101", args.workdir / "bucket", prevalence=args.prevalence,
                          max_images=negatives, split="train")
    output = args.workdir / "results"
    shutil.rmtree(output, ignore_errors=True)
    init_ray(None)
    stats = run_moderation(ModerationConfig(input=str(bucket.root), output=str(output)))
    rows = []
    for name, kwargs in (("default", {}), ("rebuilt", {}),
                         ("500 + 500", {"max_thumbnails": 500, "near_threshold": 500})):
        report = build_report(str(output), **kwargs)
        rows.append({"report": name, "seconds": report.seconds, "share_of_run_wall": report.seconds /
                     stats["wall_seconds"], "images_shown": report.thumbnails, "page_bytes": _size(output / "report"),
                     **{f"seconds_{part}": s for part, s in report.seconds_by_part.items()}})
    print(f"run: {stats['images']} images, {stats['flagged']} flagged, wall {stats['wall_seconds']:.1f} s, "
          f"{stats['images_per_second']:.1f} images/s")
    print(f"{'report':<10} {'seconds':>8} {'of run':>7} {'shown':>6} {'page MB':>8}  parts")
    for row in rows:
        parts = ", ".join(f"{k.removeprefix('seconds_')} {v:.1f}" for k, v in row.items()
                          if k.startswith("seconds_"))
        print(f"{row['report']:<10} {row['seconds']:>8.1f} {row['share_of_run_wall']:>7.1%} "
              f"{row['images_shown']:>6} {row['page_bytes'] / 1e6:>8.2f}  {parts}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform()},
        "run": {key: stats[key] for key in ("images", "flagged", "errors", "wall_seconds", "images_per_second",
                                            "compute_saving", "model", "individual_model")},
        "reports": rows, "targets": {"share_of_run_wall": 0.10, "page_bytes_with_500_thumbnails": 5e6},
        "measured": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}, indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
