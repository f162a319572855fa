"""Ray Data's "no available CPUs" warning, checked where it is true and not where it cannot be.

Ray Data checks ``ray.available_resources()`` each time it executes a Dataset eagerly, and warns
once per process that the job "will hang" when no CPU is free. ``write_parquet`` executes twice:
once to run the stream, and once more when it finishes, to wrap the blocks it has just computed
(``materialize``). That second check runs while the stream's actor pool and last tasks are still
giving their CPUs back, so on a small node it can see 0 free CPUs and warn about a job that has
already finished and needs no CPU at all (seen on 2 cores, at the end of ``ngt-ray demo``).

``free_cpu_checked`` makes the check ngt-ray's own: before the stream starts it waits briefly for
a CPU to be free (resources come back a moment after the work that held them ends), and warns in
its own words if none is, because then the warning is true. While the stream runs, Ray Data's copy of
the check is dropped: it has already been answered.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator

import ray

logger = logging.getLogger(__name__)

# The logger and message of Ray Data's check (ray/data/dataset.py, Dataset._execute)
_RAY_DATA_LOGGER = "ray.data.dataset"
_RAY_DATA_MESSAGE = "does not have any available CPUs"


def wait_for_a_free_cpu(timeout: float = 30.0) -> bool:
    """Whether a CPU is free on the cluster, waiting up to ``timeout`` seconds for one (it returns
    as soon as one is)."""
    deadline = time.monotonic() + timeout
    while ray.available_resources().get("CPU", 0.0) <= 0:
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)
    return True


class _AlreadyChecked(logging.Filter):
    """Drops Ray Data's free-CPU warning: ``free_cpu_checked`` has checked it for this execution."""

    def filter(self, record: logging.LogRecord) -> bool:
        return _RAY_DATA_MESSAGE not in record.getMessage()


@contextlib.contextmanager
def free_cpu_checked(timeout: float = 30.0) -> Iterator[None]:
    """Run one driver-started Dataset execution inside this, after checking for a free CPU here."""
    if not wait_for_a_free_cpu(timeout):
        logger.warning("no CPU on the Ray cluster has been free for %.0f s: the job's read, decode and write "
                       "tasks will wait until one is (%s)", timeout, ray.available_resources())
    ray_data, checked = logging.getLogger(_RAY_DATA_LOGGER), _AlreadyChecked()
    ray_data.addFilter(checked)
    try:
        yield
    finally:
        ray_data.removeFilter(checked)
