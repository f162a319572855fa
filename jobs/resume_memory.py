"""The driver's memory when a run resumes over a bucket whose objects are (nearly) all written already.

    python jobs/resume_memory.py --workdir /tmp/resume-memory --sizes 10000 100000 1000000
    python jobs/resume_memory.py --workdir /tmp/rm --old-tree /tmp/ngt-before   # also the code before

For each N it makes a local bucket of N empty objects (``00000000.jpg`` ...; listing them costs what
listing a bucket does, reading them is never needed) and the flags an interrupted run would have
left: every object but the last ``--left`` written, in files of 4096 rows (``--rows-per-file``'s
default) in input order, with ``FLAGS_SCHEMA`` rows (placeholder error rows: only the uris matter
to a resume). Then it resumes that run with ``--stub-models``, in a fresh interpreter with torch
imported and its own local Ray, the input either listed on the driver (``listing``) or named by a
Parquet manifest of the N keys (``manifest``: nothing listed on the driver, so what is left is the
resume itself). The driver's peak RSS is the kernel's (``VmHWM``: the process's high-water mark,
Ray's shared object-store pages it touched included); its idle RSS is taken after torch, ngt_ray and
Ray are up, before the run. Each run is checked: every object exactly once in flags/, and
``resumed_rows`` the rows written before.

``--old-tree``: a checkout of ngt-ray from before the resume was read per key range (one frozenset
of every uri written, built on the driver), run the same way for comparison.

Prints a table and writes ``docs/benchmarks/resume-memory.json``. Not a timing benchmark: wall
seconds are reported, on whatever machine runs it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import threading
import time
from pathlib import Path

_STATUS = ("VmHWM", "VmRSS", "RssAnon", "RssFile", "RssShmem")


def _memory() -> dict[str, int]:
    """This process's memory, in kB, from ``/proc/self/status``."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            name, _, value = line.partition(":")
            if name in _STATUS:
                out[name] = int(value.split()[0])
    return out


def make_bucket(root: Path, n: int) -> list[str]:
    """``n`` empty objects under ``root`` (kept between invocations); their names, sorted."""
    names = [f"{i:08d}.jpg" for i in range(n)]
    marker = root.with_name(f"{root.name}.complete")
    if not marker.exists():
        root.mkdir(parents=True, exist_ok=True)
        for name in names:
            os.close(os.open(root / name, os.O_CREAT | os.O_WRONLY, 0o644))
        marker.touch()
    return names


def make_flags(output: Path, uris: list[str], rows_per_file: int) -> None:
    """The flags of an interrupted run that wrote ``uris``, in input order, ``rows_per_file`` a file."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from ngt_ray.job.contracts import FLAGS_SCHEMA

    flags = output / "flags"
    flags.mkdir(parents=True, exist_ok=True)
    for j, start in enumerate(range(0, len(uris), rows_per_file)):
        chunk = uris[start:start + rows_per_file]
        n = len(chunk)
        columns = {"uri": chunk, "flagged": [False] * n, "decided_by": ["error"] * n, "tests": [0.0] * n,
                   "compute_macs": [0.0] * n, "error": ["decode failed: empty object"] * n,
                   "error_kind": ["decode"] * n}
        table = pa.table({f.name: columns.get(f.name, pa.nulls(n, f.type)) for f in FLAGS_SCHEMA}, schema=FLAGS_SCHEMA)
        pq.write_table(table, flags / f"part-{j:06d}.parquet")


def _reset(output: Path) -> None:
    """Back to the interrupted run's state: only the synthetic flags files (another run's are removed)."""
    for f in (output / "flags").iterdir():
        if not f.name.startswith("part-"):
            f.unlink()
    for name in ("run.json", "_SUCCESS", "stats.parquet", "_LEASE.json"):
        (output / name).unlink(missing_ok=True)


def child(args: argparse.Namespace) -> None:
    """One resumed run in this interpreter; its memory and stats as one JSON line."""
    import ray
    import torch  # noqa: F401  (the driver of a run imports it: models and profiling)

    from ngt_ray.job.outputs import run_config
    from ngt_ray.job.pipeline import ModerationConfig, run_moderation

    ray.init(address="local", num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)  # its own Ray
    idle = _memory()
    cfg = ModerationConfig(input=args.input, output=args.output, stub_models=True, measure_time=False,
                           input_manifest=args.manifest)
    # the interrupted run's record (this code's own config fields), as RunOutput.open writes it
    (Path(args.output) / "run.json").write_text(json.dumps(run_config(cfg), indent=2, sort_keys=True))
    peaks = {"RssAnon": 0}
    running = True

    def sample() -> None:
        while running:
            peaks["RssAnon"] = max(peaks["RssAnon"], _memory()["RssAnon"])
            time.sleep(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    start = time.perf_counter()
    stats = run_moderation(cfg)
    wall = time.perf_counter() - start
    running = False
    sampler.join()
    end = _memory()
    print("RESULT " + json.dumps({
        "idle_rss_mib": idle["VmRSS"] / 1024, "idle_anon_mib": idle["RssAnon"] / 1024,
        "idle_file_mib": idle["RssFile"] / 1024, "peak_rss_mib": end["VmHWM"] / 1024,
        "peak_anon_mib": peaks["RssAnon"] / 1024, "end_rss_mib": end["VmRSS"] / 1024,
        "end_shmem_mib": end["RssShmem"] / 1024, "wall_seconds": wall,
        "resumed_rows": stats["resumed_rows"], "images": stats["images"], "objects": stats["objects"]}))
    ray.shutdown()


def _run(tree: Path, input_: str, output: Path, manifest: str | None, cpus: int, timeout: float) -> dict:
    command = [sys.executable, __file__, "--child", "--input", input_, "--output", str(output), "--cpus", str(cpus)]
    if manifest:
        command += ["--manifest", manifest]
    env = {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, "PYTHONPATH": str(tree)}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout, cwd=tree)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    if done.returncode or not lines:
        raise RuntimeError(f"resume failed ({done.returncode}):\n{done.stderr[-4000:]}")
    return json.loads(lines[-1].removeprefix("RESULT "))


def _check(output: Path, expected: list[str], result: dict, written: int) -> None:
    """Every object exactly once in flags/, and the resume kept what was written before."""
    import pyarrow.parquet as pq

    uris = pq.read_table(output / "flags", columns=["uri"]).column("uri").to_pylist()
    assert len(uris) == len(set(uris)) == len(expected) and set(uris) == set(expected), "not every object once"
    assert result["resumed_rows"] == written and result["images"] == len(expected), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, help="where the buckets and outputs go (kept for reruns)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--modes", nargs="+", choices=("manifest", "listing"), default=["manifest", "listing"])
    parser.add_argument("--left", type=int, default=256, help="objects the interrupted run did not write")
    parser.add_argument("--rows-per-file", type=int, default=4096)
    parser.add_argument("--old-tree", type=Path, help="a checkout of the code before, to compare")
    parser.add_argument("--old-label", help="what --old-tree is, for the JSON (default: its path)")
    parser.add_argument("--cpus", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=3600, help="seconds one resumed run may take")
    parser.add_argument("--json", type=Path, default=Path("docs/benchmarks/resume-memory.json"))
    # one resumed run (internal)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--input", help=argparse.SUPPRESS)
    parser.add_argument("--output", help=argparse.SUPPRESS)
    parser.add_argument("--manifest", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    if args.workdir is None:
        parser.error("--workdir is required")
    import pyarrow as pa
    import pyarrow.parquet as pq

    from ngt_ray.storage import resolve

    here = Path(__file__).resolve().parent.parent
    trees = {"new": here, **({"old": args.old_tree.resolve()} if args.old_tree else {})}
    rows = []
    print(f"{'N':>9} {'input':<9} {'code':<4} {'idle MiB':>9} {'peak MiB':>9} {'peak-idle':>10} {'anon idle':>10} "
          f"{'anon peak':>10} {'wall s':>8}")
    for n in args.sizes:
        root = args.workdir / f"n{n}"
        bucket = root / "bucket"
        names = make_bucket(bucket, n)
        loc = resolve(str(bucket))
        uris = [loc.object_uri(f"{loc.path}/{name}") for name in names]
        written = len(uris) - args.left
        manifest = root / "keys.parquet"
        if not manifest.exists():
            pq.write_table(pa.table({"key": names}), manifest)
        for mode in args.modes:
            for code, tree in trees.items():
                output = root / f"out-{mode}-{code}"
                if not (output / "flags").exists():
                    make_flags(output, uris[:written], args.rows_per_file)
                _reset(output)
                result = _run(tree, str(bucket), output, str(manifest) if mode == "manifest" else None, args.cpus,
                              args.timeout)
                _check(output, uris, result, written)
                row = {"objects": len(uris), "written_before": written, "input": mode, "code": code, **result}
                rows.append(row)
                print(f"{len(uris):>9} {mode:<9} {code:<4} {row['idle_rss_mib']:>9.0f} {row['peak_rss_mib']:>9.0f} "
                      f"{row['peak_rss_mib'] - row['idle_rss_mib']:>10.0f} {row['idle_anon_mib']:>10.0f} "
                      f"{row['peak_anon_mib']:>10.0f} "
                      f"{row['wall_seconds']:>8.1f}", flush=True)
    described = subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True, text=True, cwd=here)
    labels = {"new": described.stdout.strip() or str(here),
              **({"old": args.old_label or str(args.old_tree)} if args.old_tree else {})}
    result = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, Ray num_cpus={args.cpus}", "code": labels,
              "rows_per_flags_file": args.rows_per_file, "left_to_write": args.left, "runs": rows,
              "measured": "driver VmHWM (peak RSS, shared object-store pages included) over a resumed run; idle: "
                          "VmRSS after torch, ngt_ray and ray.init, before the run; anon peak: RssAnon sampled "
                          "every 20 ms"}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
