"""free_cpu_checked on a real local Ray whose CPUs a placement group holds: ngt-ray warns where no CPU is
free, and Ray Data's own copy of that warning is dropped only inside the checked execution."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest
import ray.data
from ray.util.debug import reset_log_once
from ray.util.placement_group import placement_group, remove_placement_group

from ngt_ray.job.free_cpu import free_cpu_checked, wait_for_a_free_cpu


class _Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@pytest.fixture
def logged() -> Iterator[dict[str, _Lines]]:
    """What Ray Data's dataset module and ngt-ray's check log, caught at their own loggers."""
    names = {"ray_data": "ray.data.dataset", "ngt_ray": "ngt_ray.job.free_cpu"}
    handlers = {key: _Lines() for key in names}
    for key, name in names.items():
        logging.getLogger(name).addHandler(handlers[key])
    yield handlers
    for key, name in names.items():
        logging.getLogger(name).removeHandler(handlers[key])


def _execute_eagerly() -> None:
    """A Dataset execution that runs Ray Data's free-CPU check and needs no CPU (its rows are in
    memory already), as write_parquet's last step is."""
    reset_log_once("cpu_warning")  # Ray Data warns once per process
    ray.data.from_items([{"x": 1}, {"x": 2}]).materialize()


def test_ngt_ray_warns_and_ray_data_does_not_while_every_cpu_is_held(ray_local, logged):
    held = placement_group([{"CPU": 2}])  # both of ray_local's CPUs, reserved as a Tune trial reserves them
    ray_local.get(held.ready())
    try:
        assert not wait_for_a_free_cpu(timeout=5)
        _execute_eagerly()  # unchecked: Ray Data's own warning
        assert any("does not have any available CPUs" in line for line in logged["ray_data"].lines), logged
        logged["ray_data"].lines.clear()
        with free_cpu_checked(timeout=0.5):
            _execute_eagerly()
        assert logged["ray_data"].lines == []
        assert len(logged["ngt_ray"].lines) == 1 and "no CPU on the Ray cluster" in logged["ngt_ray"].lines[0]
    finally:
        remove_placement_group(held)
    # the CPUs come back to the pool a moment later: the check waits for them and says nothing
    with free_cpu_checked():
        _execute_eagerly()
    assert wait_for_a_free_cpu(timeout=0)
    assert len(logged["ngt_ray"].lines) == 1 and logged["ray_data"].lines == []
    # outside the check, Ray Data's warning is Ray Data's again
    assert logging.getLogger("ray.data.dataset").filters == []
