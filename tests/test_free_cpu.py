"""free_cpu_checked on a real local Ray whose CPUs a placement group holds: ngt-ray warns where no CPU is
free, and Ray Data's own copy of that warning is dropped only inside the checked execution."""

from __future__ import annotations

import logging

import pytest
import ray.data
from ray.util.debug import reset_log_once
from ray.util.placement_group import placement_group, remove_placement_group

from ngt_ray.job.free_cpu import free_cpu_checked, wait_for_a_free_cpu


def _execute_eagerly() -> None:
    """A Dataset execution that runs Ray Data's free-CPU check and needs no CPU (its rows are in
    memory already), as write_parquet's last step is."""
    reset_log_once("cpu_warning")  # Ray Data warns once per process
    ray.data.from_items([{"x": 1}, {"x": 2}]).materialize()


def _said(caplog: pytest.LogCaptureFixture, logger: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == logger]


def test_ngt_ray_warns_and_ray_data_does_not_while_every_cpu_is_held(ray_local, caplog):
    caplog.set_level(logging.WARNING)
    held = placement_group([{"CPU": 2}])  # both of ray_local's CPUs, reserved as a Tune trial reserves them
    ray_local.get(held.ready())
    try:
        assert not wait_for_a_free_cpu(timeout=5)
        _execute_eagerly()  # unchecked: Ray Data's own warning
        assert any("does not have any available CPUs" in line for line in _said(caplog, "ray.data.dataset"))
        caplog.clear()
        with free_cpu_checked(timeout=0.5):
            _execute_eagerly()
        assert _said(caplog, "ray.data.dataset") == []
        ours = _said(caplog, "ngt_ray.job.free_cpu")
        assert len(ours) == 1 and "no CPU on the Ray cluster" in ours[0], ours
    finally:
        remove_placement_group(held)
    # the CPUs come back to the pool a moment later: the check waits for them and says nothing
    caplog.clear()
    with free_cpu_checked():
        _execute_eagerly()
    assert wait_for_a_free_cpu(timeout=0)
    assert _said(caplog, "ngt_ray.job.free_cpu") == [] and _said(caplog, "ray.data.dataset") == []
    # outside the check, Ray Data's warning is Ray Data's again
    assert logging.getLogger("ray.data.dataset").filters == []
