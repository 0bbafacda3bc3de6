"""The fleet's nodes on a real local Ray cluster: each worker's GPUs are read on that worker."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from orchestrator.cluster import cluster_inventory
from tests.helpers.paths import REPO
from tests.helpers.ray_cluster import RayCluster, ray_cluster

SNAPSHOT = REPO / "tests" / "fixtures" / "gpu" / "dual_rtx3090.json"


@pytest.fixture(scope="module")
def two_boxes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RayCluster]:
    # Box B's snapshot: the same two 3090s, one of them busy with something not ours.
    data = json.loads(SNAPSHOT.read_text())
    data["gpus"][0]["memory_used_bytes"] = 10 * 1024**3
    data["gpus"][0]["memory_free_bytes"] = data["gpus"][0]["memory_total_bytes"] - 10 * 1024**3
    busy = Path(tmp_path_factory.mktemp("box-b")) / "snapshot.json"
    busy.write_text(json.dumps(data))
    with ray_cluster([(2, SNAPSHOT), (2, busy)]) as cluster:
        yield cluster


def test_every_node_reads_its_own_gpus(two_boxes: RayCluster) -> None:
    nodes = cluster_inventory()
    assert len(nodes) == 3  # the head and two boxes
    with_gpus = [node for node in nodes if node.inventory.count]
    assert len(with_gpus) == 2
    free = sorted(node.inventory.gpus[0].memory_free_bytes for node in with_gpus)
    assert free[0] < free[1]  # box B's busy GPU 0, read on box B
    assert len({node.node_id for node in nodes}) == 3
    head = [node for node in nodes if not node.inventory.count]
    assert len(head) == 1
