"""Copy-paste augmentation: product shots are cut out, scenes are not, and pastes land in scenes."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from ngt_ray.training.copypaste import PasteOptions, cut_out, paste, pasted_positives


def _product_shot() -> Image.Image:
    """A dark L-shaped object on a flat, slightly noisy white background."""
    rng = np.random.default_rng(0)
    px = np.clip(245 + rng.normal(0, 2, (200, 300, 3)), 0, 255).astype(np.uint8)
    px[60:90, 40:260] = (40, 40, 45)
    px[90:150, 200:240] = (60, 50, 40)
    return Image.fromarray(px)


def test_a_product_shot_is_cut_to_its_object_and_a_scene_is_not_cut(real_scenes):
    cut = cut_out(_product_shot())
    assert cut is not None and cut.mode == "RGBA"
    assert abs(cut.width - 220) <= 4 and abs(cut.height - 90) <= 4  # the object's box
    alpha = np.asarray(cut.getchannel("A"))
    assert alpha[5:25, 5:25].mean() > 200 and alpha[-10:, :100].mean() < 30  # object kept, background clear
    scenes = sorted((real_scenes / "scenes" / "images").iterdir())[:20]
    assert sum(cut_out(Image.open(p)) is not None for p in scenes) <= 2  # everyday photos are scenes


def test_a_paste_keeps_the_scene_and_puts_the_object_in_it(real_scenes):
    scene = Image.open(next((real_scenes / "scenes" / "images").iterdir())).convert("RGB")
    out = paste(scene, cut_out(_product_shot()), np.random.default_rng(1),
                PasteOptions(scale=(0.5, 0.5), mirror=0, blur=0, light=0))
    diff = np.abs(np.asarray(out, dtype=int) - np.asarray(scene, dtype=int)).sum(axis=2) > 30
    assert out.size == scene.size
    assert 0.01 < diff.mean() < 0.25  # the object, not the whole frame, changed


def test_pasted_positives_come_from_the_split_given(real_scenes):
    positives = [(p, 1) for p in sorted((real_scenes / "firearms" / "images").iterdir())[:30]]
    negatives = [(p, 0) for p in sorted((real_scenes / "scenes" / "images").iterdir())[:15]]
    made, used = pasted_positives(positives + negatives, 6, np.random.default_rng(0))
    assert len(made) == used["composites"] == 6 and all(label == 1 for _, label in made)
    assert 0 < used["cut_outs"] < 30 and used["scenes"] >= 13
    sizes = {(w, h) for w, h in (Image.open(io.BytesIO(blob)).size for blob, _ in made)}
    scene_sizes = {Image.open(p).size for p, _ in negatives}
    assert sizes <= scene_sizes  # every composite is one of the scenes, resized nowhere
    none, used = pasted_positives(negatives, 6, np.random.default_rng(0))
    assert none == [] and used["cut_outs"] == 0


def test_a_demo_bucket_from_a_manifest_plants_composites_among_real_positives(real_scenes, tmp_path):
    from ngt_ray.tools.demo import build_bucket

    photos = sorted((real_scenes / "firearms" / "images").iterdir())[:20]
    scenes = sorted((real_scenes / "scenes" / "images").iterdir())[:30]
    rows = [(p, 1) for p in photos] + [(p, 0) for p in scenes]
    (tmp_path / "m.csv").write_text("uri,label,split\n" + "".join(f"{p},{y},test\n" for p, y in rows))
    bucket = build_bucket(real_scenes, tmp_path / "bucket", prevalence=0.25, manifest=str(tmp_path / "m.csv"),
                          paste=30)
    names = {p.name for p in (tmp_path / "bucket").iterdir()}
    assert bucket.count == len(names) == 30 + 10 and len(bucket.positives) == 10 and bucket.positives <= names
    originals = {p.read_bytes() for p, _ in rows}
    planted = [(tmp_path / "bucket" / n).read_bytes() for n in bucket.positives]
    assert sum(blob not in originals for blob in planted) >= 3  # composites among them (30 of 50 positives)
