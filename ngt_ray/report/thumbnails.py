"""Thumbnails of the images a report shows: small JPEGs named by their uri, made once.

A thumbnail's name is a hash of its image's uri, so a report built again (or after a resumed run)
makes only the ones it lacks. Images are read through the job's fetch layer (retried, classified;
a packed sample by reading its container, as the job does). Up to ``LOCAL_LIMIT`` are made in this
process on a few threads (a Ray task costs more than a hundred thumbnails); more are made in Ray
tasks of ``PER_TASK`` images, each writing its own, so a big run's report spreads over the cluster.
"""

from __future__ import annotations

import hashlib
import io
import warnings
from collections import defaultdict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from PIL import Image

from ngt_ray.job.fetch import FetchError, clean, fetch, put, single_attempt_client
from ngt_ray.job.sources import read_samples
from ngt_ray.storage import Location, resolve

__all__ = ["LOCAL_LIMIT", "PER_TASK", "THUMBNAIL_PX", "make_thumbnails", "thumbnail", "thumbnail_name"]

THUMBNAIL_PX = 160  # the longer side: about 6 kB a JPEG, so 500 of them stay well under 5 MB
LOCAL_LIMIT = 256
PER_TASK = 64
_QUALITY = 72


def thumbnail_name(uri: str) -> str:
    """The thumbnail's file name, relative to the report folder."""
    return f"thumbs/{hashlib.sha1(uri.encode()).hexdigest()[:20]}.jpg"


def thumbnail(data: bytes, px: int = THUMBNAIL_PX) -> bytes:
    """``data`` (any image Pillow reads) as an RGB JPEG whose longer side is at most ``px``."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with Image.open(io.BytesIO(data)) as img:
            if img.format == "JPEG":
                img.draft("RGB", (px, px))  # decode at 1/2 to 1/8 scale: a fraction of a full decode
            if img.mode.startswith("I;16"):  # 16-bit grey: its top 8 bits (convert would clip it to white)
                img = Image.fromarray((np.asarray(img) >> 8).astype(np.uint8))
            elif img.mode not in ("RGB", "L"):  # palette, alpha, CMYK, ...: resampled as RGB
                img = img.convert("RGB")
            img.thumbnail((px, px), Image.Resampling.LANCZOS)
            small = img.convert("RGB")
    out = io.BytesIO()
    small.save(out, "JPEG", quality=_QUALITY, optimize=True)
    return out.getvalue()


def make_thumbnails(uris: Sequence[str], report: Location, *, s3_endpoint: str | None = None,
                    packed_columns: tuple[str | None, str | None] = (None, None),
                    px: int = THUMBNAIL_PX) -> dict[str, str]:
    """Write the thumbnail of every uri under ``report`` (those already there are kept); return
    ``{uri: why}`` for the images that have none (unreadable, not an image).

    ``packed_columns``: the run's ``(image_column, key_column)``, for samples of Parquet inputs.
    """
    have = _existing(report)
    todo = [uri for uri in dict.fromkeys(uris) if thumbnail_name(uri).rsplit("/", 1)[1] not in have]
    if len(todo) <= LOCAL_LIMIT:
        return _make(todo, report, s3_endpoint, packed_columns, px)
    import ray

    task = ray.remote(num_cpus=1)(_make)
    failed: dict[str, str] = {}
    for part in ray.get([task.remote(todo[i:i + PER_TASK], report, s3_endpoint, packed_columns, px)
                         for i in range(0, len(todo), PER_TASK)]):
        failed.update(part)
    return failed


def _existing(report: Location) -> set[str]:
    folder = report.join("thumbs")
    try:
        return {path.rsplit("/", 1)[1] for path in report.fs.ls(folder.path, detail=False)}
    except FileNotFoundError:
        return set()


def _make(uris: list[str], report: Location, s3_endpoint: str | None,
          packed_columns: tuple[str | None, str | None], px: int) -> dict[str, str]:
    """Read, shrink and write the thumbnails of ``uris``; ``{uri: why}`` for those that failed."""
    failed: dict[str, str] = {}
    blobs = _read_images(uris, s3_endpoint, packed_columns, failed)
    client = single_attempt_client(report.fs)  # one S3 client for every write: each new one opens a session

    def one(uri: str, data: bytes) -> None:
        try:
            small = thumbnail(data, px)
        except Exception as exc:  # noqa: BLE001 - a bad image is a row without a thumbnail, never a failed report
            failed[uri] = clean(f"not a readable image: {type(exc).__name__}: {exc}")
            return
        put(client, report.join(thumbnail_name(uri)).path, small)

    with ThreadPoolExecutor(4) as pool:  # Pillow and the writes release the GIL
        list(pool.map(lambda kv: one(*kv), blobs.items()))
    return failed


def _read_images(uris: list[str], s3_endpoint: str | None, packed_columns: tuple[str | None, str | None],
                 failed: dict[str, str]) -> dict[str, bytes]:
    """The bytes of each uri (plain objects with one ``fetch``, packed samples container by container)."""
    stores: dict[str, Location] = {}  # one filesystem per scheme: resolving makes a fresh client
    plain: dict[str, list[str]] = defaultdict(list)
    packed: dict[tuple[str, str], set[str]] = defaultdict(set)
    for uri in uris:
        scheme = uri.split("://", 1)[0] if "://" in uri else "file"
        if scheme not in stores:
            stores[scheme] = resolve(uri.split("#", 1)[0], s3_endpoint)
        if "#" in uri:
            packed[(scheme, stores[scheme].object_path(uri))].add(uri)
        else:
            plain[scheme].append(uri)
    blobs: dict[str, bytes] = {}
    for scheme, named in plain.items():
        loc = stores[scheme]
        for uri, got in zip(named, fetch(loc.fs, [loc.object_path(u) for u in named]).results):
            if isinstance(got, FetchError):
                failed[uri] = str(got)
            else:
                blobs[uri] = got
    image_column, key_column = packed_columns
    for (scheme, container), wanted in packed.items():
        try:
            for uri, data, error in read_samples(stores[scheme], [container], image_column=image_column,
                                                 key_column=key_column):
                if uri in wanted:
                    if error is None:
                        blobs[uri] = data
                    else:
                        failed[uri] = error.message
        except (OSError, ValueError) as exc:
            for uri in wanted:
                failed[uri] = clean(f"{type(exc).__name__}: {exc}")
        for uri in wanted - blobs.keys() - failed.keys():
            failed[uri] = "not found in its container"
    return blobs
