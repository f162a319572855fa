"""Write the labelled manifest the packaged firearm model is trained and judged on (run here, not on a cluster).

    python jobs/firearm_manifest.py firearm.csv
    ngt-ray train --positive-class firearm --manifest firearm.csv --design tree

Positives: the web firearm photos of ``weapons/`` (people holding guns at ranges, in streets and
shops, product shots), the licensed firearm photos and Caltech-101's revolvers. Negatives that look
like the positives' world: the knives of ``weapons/`` (same exporter, squares and watermarks), the
everyday photos of ``everyday/`` and ``scenes/`` (people, streets, rooms, hands holding phones and
tools), Caltech-101's background and face photos whole and 12 photos of every other Caltech class.

Splits go by source family (``ngt_ray.training.families``): frames of one video, one scrape's
numbered runs and near-duplicates stay on one side. Caltech photos keep their Caltech split, so the
Caltech demo's test photos are never trained on. The columns ``family`` and ``scene`` say where each
photo comes from; ``scene`` is ``in_scene`` for the weapons photos the exporter's heuristic calls
scenes, and the in-scene test split (``split == test`` and ``scene == in_scene``) is what the
model is judged on: nothing trains, calibrates or selects on it. The photos keep their attribution
in ``../shared/data/*/ATTRIBUTION.md``; the manifest holds only their paths.
"""

from __future__ import annotations

import csv
import re
import sys
from collections import Counter
from pathlib import Path

from ngt_ray.options import shared_data_root
from ngt_ray.training.datasets import caltech_split
from ngt_ray.training.families import difference_hash, family_splits, name_family, near_duplicate_families

_WHOLE = ("BACKGROUND_Google", "Faces", "Faces_easy")
_PER_CLASS = 12
COLUMNS = ["uri", "label", "source", "split", "family", "scene"]


def _everyday_source(name: str) -> str:
    """``everyday/core50`` and the like: the collection a file of ``everyday/`` comes from."""
    return "everyday/" + re.split(r"[_\-]", name, maxsplit=1)[0].lower()


def _hashed(root: Path) -> list[dict]:
    """Rows of the photos outside Caltech, each with its name family (splits come later)."""
    rows = []
    with (root / "weapons" / "manifest.csv").open() as f:
        for r in csv.DictReader(f):
            rows.append({"uri": str(root / "weapons" / r["file"]), "label": int(r["label"] == "firearm"),
                         "source": f"weapons/{r['label']}", "scene": r["scene"]})
    rows += [{"uri": str(p), "label": 1, "source": "firearms", "scene": ""}
             for p in sorted((root / "firearms" / "images").iterdir())]
    rows += [{"uri": str(p), "label": 0, "source": _everyday_source(p.name), "scene": ""}
             for p in sorted((root / "everyday" / "images").iterdir())]
    rows += [{"uri": str(p), "label": 0, "source": "scenes", "scene": ""}
             for p in sorted((root / "scenes" / "images").iterdir())]
    for row in rows:
        row["family"] = f"{row['source']}:{name_family(row['uri'])}"
    hashes = [difference_hash(Path(row["uri"]).read_bytes()) for row in rows]
    for row, family in zip(rows, near_duplicate_families([r["family"] for r in rows], hashes,
                                                                         [r["source"] for r in rows])):
        row["family"] = family
    for row, split in zip(rows, family_splits([r["family"] for r in rows], [r["source"] for r in rows])):
        row["split"] = split
    return rows


def _caltech(root: Path) -> list[dict]:
    rows = []
    for split in ("train", "val", "test"):
        for path, label in caltech_split(root / "caltech101", split):
            cls = Path(path).parent.name
            # Caltech's own split is by file (the demo's test photos must stay its test photos)
            rows.append({"uri": str(path), "label": label, "source": f"caltech101/{cls}", "split": split,
                         "family": f"caltech101/{cls}/{Path(path).name}", "scene": ""})
    keep = set()
    by_class: dict[str, list[str]] = {}
    for row in rows:
        by_class.setdefault(row["source"], []).append(row["uri"])
    for source, uris in by_class.items():
        uris = sorted(uris)
        if source.endswith(_WHOLE) or source == "caltech101/revolver":
            keep |= set(uris)
        else:
            keep |= set(uris[:: max(1, len(uris) // _PER_CLASS)][:_PER_CLASS])
    return [row for row in rows if row["uri"] in keep]


def rows(root: Path) -> list[dict]:
    return _hashed(root) + _caltech(root)


def main() -> None:
    dest = Path(sys.argv[1] if len(sys.argv) > 1 else "firearm.csv")
    table = rows(shared_data_root())
    with dest.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(table)
    counts = Counter((r["split"], r["label"]) for r in table)
    in_scene = sum(r["split"] == "test" and r["scene"] == "in_scene" and r["label"] == 1 for r in table)
    print(f"{dest}: " + ", ".join(f"{s} {counts[s, 1]} positives / {counts[s, 0]} negatives"
                                  for s in ("train", "val", "test")) + f"; in-scene test positives {in_scene}")


if __name__ == "__main__":
    main()
