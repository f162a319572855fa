"""Killing a run mid-way, as a crash or an OOM kill would (tests/test_outputs.py, tests/test_lease.py)."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable


def kill_once(proc: subprocess.Popen, written: Callable[[], bool], timeout: float = 300) -> None:
    """SIGKILL ``proc``'s process group as soon as ``written()`` holds (polled every 0.1 s); fail if
    ``proc`` exits first or ``timeout`` seconds pass. ``proc`` must lead its own session."""
    try:
        deadline = time.monotonic() + timeout
        while not written():
            if proc.poll() is not None:
                err = proc.stderr.read() if proc.stderr else ""
                raise AssertionError((err.decode() if isinstance(err, bytes) else err)[-3000:])
            assert time.monotonic() < deadline, f"nothing was written in {timeout:.0f} s"
            time.sleep(0.1)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
