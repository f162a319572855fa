"""The GPU check's last word: one table of what issue 21 asks a GPU run to show.

Reads the newest accelerator JSON ``ngt-ray benchmark`` wrote and, when there is one, the stats of
the ``--runtime compiled`` run; prints the ratios to the plain recipe, GPU busy, and the warm-up,
compile time and cold model calls of each run.

    python jobs/gpu_check_summary.py docs/benchmarks [/tmp/ngt-compiled-out/stats.parquet]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def _row(name: str, run: dict, plain: float) -> str:
    busy = run.get("gpu_utilisation")
    return (f"| {name} | {run['images_per_s'] / plain:.2f}x | {'n/a' if busy is None else f'{busy:.0%}'} | "
            f"{run.get('device_busy_share', 0.0):.0%} | {run.get('warmup_seconds', 0.0):.1f} | "
            f"{run.get('compile_seconds', 0.0):.1f} | {run.get('model_call_shapes', '')} | "
            f"{run.get('cold_model_calls', '')} |")


def main(folder: str, compiled: str | None = None) -> None:
    found = [p for p in Path(folder).glob("*.json") if not p.name.startswith(("cpu-", "first-"))]
    if not found:
        print("no accelerator benchmark JSON found")
        return
    result = json.loads(max(found, key=lambda p: p.stat().st_mtime).read_text())
    plain = result["plain_images_per_s"]
    print(f"\n## summary: {result['device']}, {result['n_images']} JPEGs\n")
    print("| run | vs plain | GPU busy (nvidia-smi) | model phases busy | warm-up s | compile s | shapes "
          "| cold calls |")
    print("|---|---|---|---|---|---|---|---|")
    for name, run in result["runs"].items():
        print(_row(name, run, plain))
    if compiled and Path(compiled).exists():
        import pyarrow.parquet as pq

        stats = pq.read_table(compiled).to_pylist()[0]
        print(f"\n--runtime compiled: {stats['images_per_second']:.1f} images/s, "
              f"warm-up {stats['warmup_seconds']:.1f} s, compile {stats['compile_seconds']:.1f} s, "
              f"cache hits {stats['compile_cache_hits']}, "
              f"shapes {stats['model_call_shapes']}, cold calls {stats['cold_model_calls']}")


if __name__ == "__main__":
    main(*sys.argv[1:])
