"""Write the labelled manifest the packaged firearm model is trained from (run here, not on a cluster).

Positives: the licensed firearm photos (rifles, pistols, people holding them) and Caltech-101's
revolvers. Negatives: the licensed everyday scenes (people, streets, kitchens, phones, knives),
Caltech-101's background and face photos whole, and 12 photos of every other Caltech class, so the
trainer's negative cap keeps every real-scene negative. Caltech photos keep their Caltech split (the
``split`` column), so the Caltech demo's test photos are never trained on; the others split by hash.
Attribution of the photos stays with them in
``../shared/data/*/ATTRIBUTION.md``; the manifest holds only their paths.

    python jobs/firearm_manifest.py firearm.csv
    ngt-ray train --positive-class firearm --manifest firearm.csv --design tree
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path

from ngt_ray.options import shared_data_root
from ngt_ray.training.datasets import caltech_split

_WHOLE = ("BACKGROUND_Google", "Faces", "Faces_easy")
_PER_CLASS = 12


def rows(root: Path) -> list[tuple[str, int, str, str]]:
    caltech = {str(p): split for split in ("train", "val", "test")
               for p, _ in caltech_split(root / "caltech101", split)}
    out = [(str(p), 1, "firearms", "") for p in sorted((root / "firearms" / "images").iterdir())]
    revolvers = sorted((root / "caltech101" / "train" / "revolver").glob("*.jpg"))
    out += [(str(p), 1, "caltech101/revolver", caltech[str(p)]) for p in revolvers]
    out += [(str(p), 0, "scenes", "") for p in sorted((root / "scenes" / "images").iterdir())]
    for folder in sorted((root / "caltech101" / "train").iterdir()):
        if folder.name == "revolver" or not folder.is_dir():
            continue
        photos = sorted(folder.glob("*.jpg"))
        keep = photos if folder.name in _WHOLE else photos[:: max(1, len(photos) // _PER_CLASS)][:_PER_CLASS]
        out += [(str(p), 0, f"caltech101/{folder.name}", caltech[str(p)]) for p in keep]
    return out


def main() -> None:
    dest = Path(sys.argv[1] if len(sys.argv) > 1 else "firearm.csv")
    table = rows(shared_data_root())
    with dest.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["uri", "label", "source", "split"])
        writer.writerows(table)
    print(f"{dest}: {sum(r[1] for r in table)} positives, {sum(1 - r[1] for r in table)} negatives")


if __name__ == "__main__":
    main()
