"""The job on real multi-node Ray clusters on this machine (``ray.cluster_utils.Cluster``): node
shapes that used to hang (1+1 and 2+2 CPUs) finish, the work spreads over both nodes, and every
object gets its row."""

from __future__ import annotations

import subprocess
import sys

import pyarrow.parquet as pq
import pytest
from ray.cluster_utils import Cluster

from ngt_ray.storage import resolve

_NODE = {"object_store_memory": 200 * 2**20, "include_dashboard": False}


@pytest.mark.parametrize("head_cpus, worker_cpus", [(1, 1), (2, 2), (2, 1)])
def test_small_multi_node_clusters_finish_on_both_nodes_with_every_row(planted, tmp_path, head_cpus, worker_cpus):
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": head_cpus, **_NODE})
    try:
        cluster.add_node(num_cpus=worker_cpus, **_NODE)
        cluster.wait_for_nodes()
        out = tmp_path / "out"
        job = subprocess.run(
            [sys.executable, "-m", "ngt_ray.cli", "moderate", "--input", str(planted.root), "--output", str(out),
             "--ray-address", cluster.address, "--stub-models", "--batch-size", "4", "--group-size", "4",
             "--no-measure-time", "--actor-start-timeout", "120"],
            capture_output=True, text=True, timeout=300)
        assert job.returncode == 0, job.stderr[-3000:]
    finally:
        cluster.shutdown()
    stats = pq.read_table(out / "stats.parquet").to_pylist()[0]
    uris = pq.read_table(out / "flags", columns=["uri"]).column("uri").to_pylist()
    loc = resolve(str(planted.root))
    assert sorted(uris) == sorted(loc.uri(str(p)) for p in planted.root.iterdir())  # every object once
    assert stats["images"] == planted.count and stats["errors"] == 0
    assert stats["nodes"] == 2, f"the work ran on {stats['nodes']} node(s)"
