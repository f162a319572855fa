"""The review report of a real run (real photos on the loopback S3 server, output on S3 too), built
by the CLI and rendered in headless Chromium; a reviewer's verdicts exported from the page train a
model."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import s3fs
from browser import opened, rendered

from ngt_ray.job.pipeline import ModerationConfig, run_moderation
from ngt_ray.report import build_report, thumbnails
from ngt_ray.report.thumbnails import thumbnail_name
from ngt_ray.storage import resolve
from ngt_ray.tools.demo import build_bucket
from ngt_ray.training.labelled import LabelledSet

_CLI = str(Path(sys.executable).with_name("ngt-ray"))


@pytest.fixture(scope="module")
def reviewed(ray_local, caltech, s3_server, tmp_path_factory) -> dict:
    """A run over real held-out photos (a quarter planted revolvers, one object that is not an image
    and one name with a comma) read from and written to the S3 server, reported by the CLI."""
    bucket = build_bucket(caltech, tmp_path_factory.mktemp("review") / "bucket", prevalence=0.25, max_images=36,
                          seed=3)
    fs = s3fs.S3FileSystem(endpoint_url=s3_server["endpoint"], skip_instance_cache=True)
    fs.mkdir("review")
    names = {p.name: p.name for p in bucket.root.iterdir()}
    names[sorted(bucket.positives)[0]] = 'a, "quoted" revolver.jpg'  # a uri that CSV must quote
    fs.pipe({f"review/photos/{names[n]}": (bucket.root / n).read_bytes() for n in names})
    fs.pipe("review/photos/broken.jpg", b"this is not an image")
    positives = {f"s3://review/photos/{names[n]}" for n in bucket.positives}
    output = "s3://review/out"
    stats = run_moderation(ModerationConfig(input="s3://review/photos", output=output,
                                            s3_endpoint=s3_server["endpoint"], measure_time=False))
    env = {**os.environ, "HOME": str(tmp_path_factory.mktemp("home"))}  # --open copies the page under ~/.cache
    done = subprocess.run([_CLI, "report", output, "--open", "--s3-endpoint", s3_server["endpoint"]], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    url = done.stdout.strip().splitlines()[-1].split()[1]
    assert url.startswith("file://") and url.endswith("/index.html"), done.stdout
    flags = pq.read_table("review/out/flags", filesystem=fs).to_pylist()
    return {"stats": stats, "flags": flags, "positives": positives,
            "quoted": 's3://review/photos/a, "quoted" revolver.jpg', "index": Path(url[len("file://"):]),
            "output": output, "fs": fs, "endpoint": s3_server["endpoint"], "cli": done.stdout}


def test_the_report_renders_every_flagged_image_and_exports_labels_that_train_a_model(reviewed, chromium,
                                                                                     tmp_path):
    index, flags = reviewed["index"], reviewed["flags"]
    flagged = sorted((r for r in flags if r["flagged"]), key=lambda r: -r["score"])
    assert flagged and reviewed["positives"] & {r["uri"] for r in flagged}  # the run found planted revolvers
    folder = index.parent.as_uri() + "/"
    with opened(index, chromium) as (page, requests):
        shown = rendered(page)
        assert [uri for uri, _ in shown["flagged"]] == [r["uri"] for r in flagged]  # highest score first, every one
        assert all(width > 0 for _, width in shown["flagged"]), shown  # each with its thumbnail, decoded
        assert sorted(src for src, _ in shown["plots"]) == ["plots/phases.png", "plots/rounds.png", "plots/scores.png"]
        assert all(width > 0 for _, width in shown["plots"]), shown
        assert page.inner_text("#errors-table").count("broken.jpg") == 1
        page.screenshot(path=tmp_path / "report.png", full_page=True)

        # filter and sort in the page
        page.fill(".tools[data-sheet='flagged-sheet'] .filter", flagged[0]["uri"].rsplit("/", 1)[1])
        assert page.locator("#flagged-sheet .card:visible").count() == 1
        page.fill(".tools[data-sheet='flagged-sheet'] .filter", "")
        page.select_option(".tools[data-sheet='flagged-sheet'] .order", "score-asc")
        assert page.eval_on_selector("#flagged-sheet .card", "c => c.dataset.uri") == flagged[-1]["uri"]

        # review: confirm the planted revolvers, reject every other image shown, then export
        verdicts = {}
        for sheet in ("flagged-sheet", "near-sheet"):
            for uri in page.eval_on_selector_all(f"#{sheet} .card", "cs => cs.map(c => c.dataset.uri)"):
                label = int(uri in reviewed["positives"])
                card = page.locator(f"#{sheet} .card[data-uri='{_css(uri)}']")
                card.locator(f"button[data-label='{label}']").click()
                verdicts[uri] = label
        with page.expect_download() as download:
            page.click(".tools[data-sheet='flagged-sheet'] .export")
        labels = tmp_path / "labels.csv"
        download.value.save_as(labels)
    assert all(url.startswith(folder) or url.startswith("data:") for url in requests), requests  # nothing left it
    with labels.open(newline="") as f:
        assert {row["uri"]: int(row["label"]) for row in csv.DictReader(f)} == verdicts
    assert reviewed["quoted"] in verdicts  # a comma and quotes in a uri survive the CSV
    manifest = LabelledSet.from_manifest(str(labels))
    assert dict(zip(manifest.uris, manifest.labels)) == verdicts

    # the loop closes: ngt-ray train reads the labels (s3:// uris at the loopback server) and trains on them
    done = subprocess.run([_CLI, "train", "--manifest", str(labels), "--s3-endpoint", reviewed["endpoint"],
                           "--output", str(tmp_path / "models"), "--no-screen", "--epochs", "20", "--paste", "0",
                           "--positive-class", "reviewed"], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "models" / "reviewed-lite0-individual.json").is_file()


def _css(value: str) -> str:
    return value.replace("\\", "\\\\").replace("'", "\\'")


def test_the_report_is_built_once_and_shows_what_it_is_asked_to(reviewed, tmp_path):
    fs, output, stats = reviewed["fs"], reviewed["output"], reviewed["stats"]
    thumbs = sorted(fs.find("review/out/report/thumbs"))
    before = {path: fs.info(path)["LastModified"] for path in thumbs}
    report = build_report(output, s3_endpoint=reviewed["endpoint"], max_thumbnails=2, near_threshold=3)
    assert report.thumbnails == min(2, stats["flagged"]) + 3 and report.flagged == stats["flagged"]
    assert {path: fs.info(path)["LastModified"] for path in thumbs} == before  # made once: none rewritten
    page = fs.cat("review/out/report/index.html").decode()
    assert page.count('<figure class="card"') == report.thumbnails
    if stats["flagged"] > 2:
        assert f"Showing the 2 highest-scoring of {stats['flagged']} flagged images" in page
    assert "http://" not in page and "https://" not in page  # no CDN, no network
    assert sum(fs.du("review/out/report", total=False).values()) < 5e6


def test_big_runs_make_thumbnails_in_ray_tasks_as_the_driver_would(reviewed, monkeypatch, tmp_path):
    fs, flags = reviewed["fs"], reviewed["flags"]
    made = {path.rsplit("/", 1)[1] for path in fs.find("review/out/report/thumbs")}  # by the CLI's report
    uris = [r["uri"] for r in flags if thumbnail_name(r["uri"]).rsplit("/", 1)[1] in made][:9]
    assert len(uris) == 9
    folder = tmp_path / "report"
    (folder / "thumbs").mkdir(parents=True)
    monkeypatch.setattr(thumbnails, "LOCAL_LIMIT", 0)
    monkeypatch.setattr(thumbnails, "PER_TASK", 2)  # five tasks
    failed = thumbnails.make_thumbnails(uris + ["s3://review/photos/broken.jpg"], resolve(str(folder)),
                                        s3_endpoint=reviewed["endpoint"])
    assert list(failed) == ["s3://review/photos/broken.jpg"]
    assert failed["s3://review/photos/broken.jpg"].startswith("not a readable image")
    for uri in uris:  # the same bytes as the driver made for the CLI's report
        assert (folder / thumbnail_name(uri)).read_bytes() == fs.cat(f"review/out/report/{thumbnail_name(uri)}")


def test_moderate_report_shows_packed_samples_from_their_shard(planted, tmp_path):
    shard = tmp_path / "in" / "shard-000.tar"
    shard.parent.mkdir()
    photos = sorted(planted.root.iterdir())[:12]
    with tarfile.open(shard, "w") as tar:
        for i, photo in enumerate(photos):
            tar.add(photo, arcname=f"sample{i:03d}.jpg")
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # its own local Ray, as a user's run
    done = subprocess.run([_CLI, "moderate", "--input", str(tmp_path / "in"), "--output", str(out), "--stub-models",
                           "--no-measure-time", "--group-size", "4", "--report"], env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    line = done.stdout.strip().splitlines()[-1]
    assert line.startswith(f"report: {(out / 'report' / 'index.html').as_uri()} (") and "0 without a thumbnail" in line
    uris = [row["uri"] for row in pq.read_table(out / "flags").to_pylist()]
    assert uris and all("shard-000.tar#sample" in uri for uri in uris)
    made = {p.name for p in (out / "report" / "thumbs").iterdir()}
    assert made and made <= {thumbnail_name(uri).rsplit("/", 1)[1] for uri in uris}
    page = (out / "report" / "index.html").read_text()
    assert page.count('<figure class="card"') == len(made) and "no preview" not in page


def test_a_folder_without_a_run_gets_one_line_and_exit_2(tmp_path):
    (tmp_path / "not-a-run").mkdir()
    done = subprocess.run([_CLI, "report", str(tmp_path / "not-a-run")], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "holds no finished ngt-ray run" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "not-a-run" / "report").exists()
