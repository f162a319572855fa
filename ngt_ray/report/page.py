"""The report's HTML: a headline, the flagged images as a contact sheet, the cleared images nearest
the threshold, the plots and the errors.

Everything the page loads lies in its folder (``report.css``, ``report.js``, ``thumbs/``,
``plots/``): it opens from a disk or a bucket copy with no CDN and no network. Every value from the
run is escaped; the script only sorts, filters, keeps verdicts and exports them.
"""

from __future__ import annotations

import math
from html import escape
from typing import Any

import pyarrow as pa

from ngt_ray.report.results import RunResults
from ngt_ray.report.thumbnails import thumbnail_name

__all__ = ["render"]

_DECISIONS = {"retest": "individual model", "group": "group test", "subgroup": "retest of a subgroup"}


def render(results: RunResults, failed: dict[str, str], generated: str) -> str:
    """The page of ``results``; ``failed``: the images without a thumbnail, and why."""
    stats = results.stats
    shown = results.flagged.num_rows
    more = (f'<p class="note">Showing the {shown} highest-scoring of {results.flagged_total} flagged images; '
            f'every one is in <code>flags/</code>.</p>' if results.flagged_total > shown else "")
    return f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<link rel="icon" href="data:,">
<link rel="stylesheet" href="report.css">
<title>ngt-ray report: {escape(results.url)}</title>
</head>
<body data-run="{escape(results.url)}">
<h1>ngt-ray report</h1>
<p class="sub">{escape(results.url)} &middot; built {escape(generated)}</p>
{_headline(stats)}
{_config(stats)}
<h2 id="flagged">Flagged images</h2>
<p class="note">Confirm or reject each image; <b>export labels.csv</b> writes your verdicts as
<code>uri,label</code> (1 confirmed, 0 rejected), which <code>ngt-ray train --manifest</code> and
<code>ngt-ray calibrate --manifest</code> read. Verdicts are kept in this browser until exported.
<span class="label-count"></span></p>
{more}
{_sheet("flagged-sheet", results.flagged, failed, "No image was flagged.")}
<h2 id="near">Cleared, near the threshold</h2>
<p class="note">The {results.near.num_rows} cleared images whose scores came closest to the threshold of the
test that cleared them: what the run might have missed. Confirm any that should have been flagged.</p>
{_sheet("near-sheet", results.near, failed, "No image was cleared with a score.")}
<h2 id="plots">Plots</h2>
<div class="plots">
<img src="plots/scores.png" alt="score histogram, with the thresholds">
<img src="plots/phases.png" alt="time per phase">
<img src="plots/rounds.png" alt="images decided and seconds spent per round">
</div>
<h2 id="errors">Errors</h2>
{_errors(results)}
<script src="report.js"></script>
</body>
</html>
"""


def _number(value: Any, fmt: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return format(value, fmt)


def _headline(stats: dict[str, Any]) -> str:
    tiles = [("objects", _number(stats.get("objects"), ",")), ("flagged", _number(stats.get("flagged"), ",")),
             ("error rows", _number(stats.get("errors"), ",")),
             ("compute saving", _number(stats.get("compute_saving"), ".1%")),
             ("time saving", _number(stats.get("time_saving"), ".1%")),
             ("wall time", f"{_number(stats.get('wall_seconds'), '.1f')} s"),
             ("images/s", _number(stats.get("images_per_second"), ".1f"))]
    cells = "".join(f'<div class="tile"><b>{escape(value)}</b><span>{escape(name)}</span></div>'
                    for name, value in tiles)
    return f'<div class="tiles" id="headline">{cells}</div>'


def _config(stats: dict[str, Any]) -> str:
    rows = [("screen model", stats.get("model")), ("individual model", stats.get("individual_model")),
            ("design", stats.get("design")), ("group size k", stats.get("group_size")),
            ("mean group size", _number(stats.get("mean_group_size"), ".2f")),
            ("algorithm", stats.get("algorithm")),
            ("group threshold", _number(stats.get("group_threshold"), ".4f")),
            ("individual threshold", _number(stats.get("individual_threshold"), ".4f")),
            ("group tests + confirmations", f"{stats.get('group_tests')} + {stats.get('retests')}"),
            ("device, runtime", f"{stats.get('device')}, {stats.get('runtime')}"),
            ("input", stats.get("input"))]
    body = "".join(f"<tr><th>{escape(name)}</th><td>{escape(str(value))}</td></tr>" for name, value in rows)
    return f'<h2 id="config">Configuration</h2><table id="config-table">{body}</table>'


def _sheet(sheet_id: str, rows: pa.Table, failed: dict[str, str], empty: str) -> str:
    tools = f"""<div class="tools" data-sheet="{sheet_id}">
<input class="filter" type="search" placeholder="filter by uri" aria-label="filter by uri">
<select class="decided" aria-label="decided by"><option value="">decided by: any</option>
{"".join(f'<option value="{k}">{escape(v)}</option>' for k, v in _DECISIONS.items())}</select>
<select class="verdict" aria-label="verdict"><option value="">verdict: any</option>
<option value="none">not labelled</option><option value="1">confirmed</option>
<option value="0">rejected</option></select>
<select class="order" aria-label="sort"><option value="score-desc">score, highest first</option>
<option value="score-asc">score, lowest first</option><option value="uri">uri</option>
<option value="group">group</option></select>
<span class="shown"></span>
<button class="export" type="button">export labels.csv</button>
</div>"""
    cards = "\n".join(_card(row, failed) for row in rows.to_pylist())
    if not cards:
        cards = f'<p class="note">{escape(empty)}</p>'
    return f'{tools}<div class="sheet" id="{sheet_id}"><div class="grid">\n{cards}\n</div></div>'


def _card(row: dict[str, Any], failed: dict[str, str]) -> str:
    uri, score = row["uri"], row["score"] if row["score"] is not None else math.nan
    group = row["group_id"] if row["group_id"] is not None else -1
    if uri in failed:
        picture = f'<div class="none">no preview: {escape(failed[uri])}</div>'
    else:
        picture = f'<img src="{thumbnail_name(uri)}" alt="{escape(uri)}" title="{escape(uri)}">'
    decided = row["decided_by"] or ""
    group_text = f"group {group}" if group >= 0 else "no group"
    return (f'<figure class="card" data-uri="{escape(uri)}" data-score="{score:.6f}" data-decided="{escape(decided)}" '
            f'data-group="{group}" data-flagged="{int(bool(row["flagged"]))}">{picture}'
            f'<figcaption><b>{score:.3f}</b> {escape(_DECISIONS.get(decided, decided))} &middot; {group_text}'
            f'<div class="uri">{escape(uri)}</div></figcaption>'
            '<button type="button" data-label="1">confirm</button> '
            '<button type="button" data-label="0">reject</button></figure>')


def _errors(results: RunResults) -> str:
    if not results.errors:
        return '<p class="note" id="no-errors">No error rows: every object was scored.</p>'
    rows = []
    for kind, summary in sorted(results.errors.items(), key=lambda kv: -kv[1].count):
        examples = "<br>".join(f'<span class="uri">{escape(uri)}</span>: {escape(message)}'
                               for uri, message in summary.examples)
        rows.append(f"<tr><td>{escape(kind)}</td><td>{summary.count:,}</td><td>{examples}</td></tr>")
    return ('<table id="errors-table"><tr><th>error_kind</th><th>rows</th><th>examples</th></tr>'
            f'{"".join(rows)}</table>')
