"""The README's first command, as a new user meets it: ``ngt-ray demo`` prints progress and its
result, and not one warning line caused by how ngt-ray uses Ray, torch or its own code."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
from browser import opened, rendered


def test_the_demo_runs_with_a_quiet_console_and_ends_with_its_report(caltech, chromium, tmp_path):
    env = {**os.environ, "NGT_RAY_DATA": str(caltech.parent)}
    for name in ("RAY_ADDRESS", "RAY_DATA_DISABLE_PROGRESS_BARS"):  # a fresh local Ray, as on a new machine
        env.pop(name, None)
    cli = Path(sys.executable).with_name("ngt-ray")
    done = subprocess.run([str(cli), "demo", "--max-images", "300", "--workdir", str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=900)
    console = done.stdout + done.stderr
    assert done.returncode == 0, console[-3000:]
    assert re.search(r"recall of planted positives: \d+/\d+", done.stdout), done.stdout
    assert "0 cold calls" in done.stdout
    # it ends with its review page: one card per flagged image
    page = re.search(r"^report: file://(\S+/index\.html) ", done.stdout.splitlines()[-1])
    assert page, done.stdout
    flagged = pq.read_table(tmp_path / "results" / "stats.parquet")["flagged"][0].as_py()
    with opened(Path(page.group(1)), chromium) as (browser_page, _):  # rendered: thumbnails and plots decoded
        shown = rendered(browser_page)
    assert len(shown["flagged"]) == flagged and all(width > 0 for _, width in shown["flagged"]), shown
    assert len(shown["plots"]) == 3 and all(width > 0 for _, width in shown["plots"]), shown
    lines = console.splitlines()
    warnings = [i for i, line in enumerate(lines) if "warning" in line.lower()]
    # each with the console lines before it: which step of the demo it came from
    assert not warnings, "\n---\n".join("\n".join(lines[max(0, i - 6):i + 1]) for i in warnings)
