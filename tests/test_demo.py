"""The README's first command, as a new user meets it: ``ngt-ray demo`` prints progress and its
result, and not one warning line caused by how ngt-ray uses Ray, torch or its own code."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq


def test_the_demo_runs_with_a_quiet_console(caltech, tmp_path):
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
    assert Path(page.group(1)).read_text().count('data-flagged="1"') == flagged
    warnings = [line for line in console.splitlines() if "warning" in line.lower()]
    assert not warnings, "\n".join(warnings)
