"""The storage-fault harness's table, refreshed in docs/faults.md.

    python jobs/fault_report.py            # every fault, the outage and the kills (about 3 minutes)
    python jobs/fault_report.py -k slowdown

It runs tests/test_faults.py (the proxy, the S3 server on loopback and the real photos are the tests'
fixtures, so the report and CI exercise one harness) and replaces the table between the markers in
docs/faults.md with the one the run wrote.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "faults.md"
BEGIN, END = "<!-- fault table: jobs/fault_report.py -->", "<!-- end of fault table -->"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-k", default="job or killed", help="pytest -k expression over tests/test_faults.py")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        table = Path(tmp) / "table.md"
        run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", args.k,
                              str(ROOT / "tests" / "test_faults.py")],
                             cwd=ROOT, env={**os.environ, "NGT_RAY_FAULT_REPORT": str(table)})
        if not table.exists():
            print("the harness wrote no table", file=sys.stderr)
            return run.returncode or 1
        rows = table.read_text()
    text = DOC.read_text()
    head, rest = text.split(BEGIN, 1)
    DOC.write_text(f"{head}{BEGIN}\n{rows}{END}{rest.split(END, 1)[1]}")
    print(rows)
    return run.returncode


if __name__ == "__main__":
    sys.exit(main())
