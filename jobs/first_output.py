"""Time to the first flagged row: a listed bucket against the same objects named by a manifest.

    python jobs/first_output.py --make 20000 --workdir /tmp/first-output    # a local bucket of tiny JPEGs
    python jobs/first_output.py --input s3://bucket/prefix --workdir /tmp/fo  # your bucket

Both runs use the stub models, so what differs is only how the objects are found: the driver's
listing before the first read, or Ray tasks reading a Parquet manifest of keys (written once from
a listing before either run, outside the timing). Prints a table and writes
``docs/benchmarks/first-output.json``.
"""

from __future__ import annotations

import argparse
import io
import json
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import ray
from PIL import Image

from ngt_ray.job.pipeline import ModerationConfig, run_moderation
from ngt_ray.job.sources import list_objects
from ngt_ray.storage import resolve


def make_bucket(root: Path, n: int) -> str:
    """``n`` tiny distinct JPEGs under ``root``: the listing is what is measured, not the decode."""
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        buf = io.BytesIO()
        Image.new("RGB", (32, 32), (i % 256, (i // 256) % 256, 128)).save(buf, "JPEG")
        (root / f"{i:08d}.jpg").write_bytes(buf.getvalue())
    return str(root)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input", help="bucket URL or folder (default: --make a local one)")
    parser.add_argument("--make", type=int, default=20000, help="objects in the local bucket made without --input")
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--s3-endpoint")
    parser.add_argument("--json", type=Path, default=Path("docs/benchmarks/first-output.json"))
    args = parser.parse_args()
    bucket = args.input or make_bucket(args.workdir / "bucket", args.make)
    loc = resolve(bucket, args.s3_endpoint)
    start = time.perf_counter()
    keys = list_objects(loc)
    listing = time.perf_counter() - start
    manifest = args.workdir / "keys.parquet"
    pq.write_table(pa.table({"key": [loc.uri(k) for k in keys]}), manifest)
    ray.init()
    runs: dict[str, dict] = {}
    # alternated, twice: the first run of a session also pays for starting Ray's workers
    for attempt, (name, extra) in enumerate([("listed", {}), ("manifest", {"input_manifest": str(manifest)})] * 2):
        stats = run_moderation(ModerationConfig(input=bucket, output=str(args.workdir / name), stub_models=True,
                                                measure_time=False, s3_endpoint=args.s3_endpoint, overwrite=True,
                                                **extra))
        run = runs.setdefault(name, {"seconds_to_first_output": [], "wall_seconds": [], "images": stats["images"]})
        run["seconds_to_first_output"].append(stats["seconds_to_first_output"])
        run["wall_seconds"].append(stats["wall_seconds"])
        print(f"pass {attempt // 2 + 1} {name}: first output {stats['seconds_to_first_output']:.2f} s")
    second = {name: run["seconds_to_first_output"][1] for name, run in runs.items()}
    result = {"objects": len(keys), "driver_listing_seconds": listing, "runs": runs,
              "first_output_ratio_manifest_to_listed": second["manifest"] / second["listed"]}
    print(f"{len(keys)} objects; the driver's listing alone took {listing:.2f} s")
    print(f"{'input':<10} {'first output s (pass 1, 2)':>28} {'wall s (pass 1, 2)':>20}")
    for name, run in runs.items():
        first, wall = run["seconds_to_first_output"], run["wall_seconds"]
        print(f"{name:<10} {first[0]:>13.2f} {first[1]:>14.2f} {wall[0]:>9.1f} {wall[1]:>10.1f}")
    print(f"manifest / listed, time to first output (pass 2): {result['first_output_ratio_manifest_to_listed']:.2f}x")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
