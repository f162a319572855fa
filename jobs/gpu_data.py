"""Build ``.gpudata/``: the photos a GPU check needs, small enough to travel (run here, not there).

The GPU machine has no ``../shared``. This copies every held-out revolver of the Caltech-101 test
split and ``--negatives`` held-out negatives spread over the classes, and leaves every other file
of the training folder as an empty placeholder of the same name, so ``caltech_split`` (a hash of
the file names per class) gives the same splits there. Empty files are skipped by the demo and
the benchmark.

    python jobs/gpu_data.py [--negatives 450]   # then carry .gpudata, NGT_RAY_DATA=.gpudata
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from ngt_ray.options import shared_data_root
from ngt_ray.training.datasets import caltech_split


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--negatives", type=int, default=450)
    parser.add_argument("--output", default=".gpudata")
    args = parser.parse_args()
    src = shared_data_root() / "caltech101"
    dest = Path(args.output) / "caltech101"
    shutil.rmtree(dest, ignore_errors=True)
    test = caltech_split(src, "test")
    negatives = [p for p, label in test if not label]
    keep = {p for p, label in test if label} | set(negatives[:: max(1, len(negatives) // args.negatives)])
    size = 0
    for path in sorted((src / "train").glob("*/*.jpg")):
        out = dest / "train" / path.parent.name / path.name
        out.parent.mkdir(parents=True, exist_ok=True)
        if path in keep:
            shutil.copyfile(path, out)
            size += path.stat().st_size
        else:
            out.touch()
    print(f"{dest}: {len(keep)} photos ({size / 1e6:.1f} MB), the rest empty placeholders")


if __name__ == "__main__":
    main()
