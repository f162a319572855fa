"""The review report: one static page per run (``<output>/report/index.html``) that shows what was
flagged, how sure the job was, what it may have missed and where the compute went, and hands a
reviewer's verdicts back as a ``labels.csv`` that training reads.

* ``results``: what the page shows, read from ``flags/``, ``stats.parquet`` and ``run.json`` in
  one streaming pass (flat memory however many rows);
* ``thumbnails``: small JPEGs of the shown images, made once, in Ray tasks for big runs;
* ``plots``: the score histogram, the phase times and the savings per round (matplotlib);
* ``page``: the HTML (no CDN, no network: everything it loads lies in its folder);
* ``build``: all of it written to the output, local or s3://.
"""

from ngt_ray.report.build import Report, build_report

__all__ = ["Report", "build_report"]
