"""``ngt-ray report <output>``: the review page of a finished run (``ngt_ray.report``)."""

from __future__ import annotations

from dataclasses import dataclass

from ngt_ray.job.plan import OnCluster
from ngt_ray.options import option

__all__ = ["ReportConfig"]


@dataclass(frozen=True, kw_only=True)
class ReportConfig(OnCluster):
    """Which run to report on, and how much of it to show."""

    output: str | None = option(None, cli=False)  # the run's --output, given as the positional argument
    s3_endpoint: str | None = option(None, "S3 endpoint URL of an s3:// output and of the images (default: the "
                                           "run's own, then $AWS_ENDPOINT_URL or AWS)")
    max_thumbnails: int = option(500, "flagged images shown as thumbnails, highest score first")
    near_threshold: int = option(24, "cleared images shown whose scores came closest to their threshold")
    open: bool = option(False, "print the file:// URL of the page (an s3:// report is copied to "
                               "~/.cache/ngt-ray/reports/ first)")
