"""The fleet's nodes on a real local Ray cluster: each worker's GPUs are read on that worker,
merged into one inventory whose GPUs name their node and keep their indices."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from orchestrator.cluster import ClusterGpuReader
from tests.helpers.paths import DUAL_3090_SNAPSHOT
from tests.helpers.ray_cluster import (
    RayCluster,
    WorkerBox,
    connected_cluster,
    start_worker,
    stop_node,
)

BUSY_BYTES = 10 * 1024**3


def busy_snapshot(folder: Path) -> Path:
    """Box B's snapshot: the same two 3090s, GPU 0 holding 10 GiB of something not ours."""
    data = json.loads(DUAL_3090_SNAPSHOT.read_text())
    gpu = data["gpus"][0]
    gpu["memory_used_bytes"] = BUSY_BYTES
    gpu["memory_free_bytes"] = gpu["memory_total_bytes"] - BUSY_BYTES
    path = folder / "busy.json"
    path.write_text(json.dumps(data))
    return path


@pytest.fixture(scope="module")
def two_boxes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RayCluster]:
    busy = busy_snapshot(tmp_path_factory.mktemp("box-b"))
    boxes = [WorkerBox("box-a", 2, DUAL_3090_SNAPSHOT), WorkerBox("box-b", 2, busy)]
    with connected_cluster(boxes) as cluster:
        yield cluster


def test_every_node_reads_its_own_gpus(two_boxes: RayCluster) -> None:
    reader = ClusterGpuReader()
    try:
        nodes = {node.node_id: node for node in reader.nodes()}
        inventory = reader.take()
    finally:
        reader.close()
    box_a, box_b = two_boxes.node("box-a").node_id, two_boxes.node("box-b").node_id
    assert len(nodes) == 3  # the head (no GPUs) and two boxes
    assert nodes[box_a].ray_gpus == nodes[box_b].ray_gpus == 2
    # Box B's busy GPU was read on box B, from the snapshot its `ray start` ran with.
    assert nodes[box_b].inventory.gpus[0].memory_used_bytes == BUSY_BYTES
    assert nodes[box_a].inventory.gpus[0].memory_used_bytes < BUSY_BYTES
    # One inventory: four GPUs, distinct cluster-wide indices, each naming its node and its
    # index there.
    assert inventory.count == 4
    assert len({gpu.index for gpu in inventory.gpus}) == 4
    assert sorted((gpu.node, gpu.node_index) for gpu in inventory.gpus) == sorted(
        [(box_a, 0), (box_a, 1), (box_b, 0), (box_b, 1)]
    )
    assert inventory.nodes == tuple(dict.fromkeys(gpu.node for gpu in inventory.gpus))
    assert {node["node_id"] for node in inventory.extra["nodes"]} == set(nodes)


def test_a_lost_node_leaves_the_inventory_and_the_others_keep_their_indices(
    two_boxes: RayCluster,
) -> None:
    reader = ClusterGpuReader()
    try:
        before = {(gpu.node, gpu.node_index): gpu.index for gpu in reader.take().gpus}
        box_c = start_worker(two_boxes, WorkerBox("box-c", 2, DUAL_3090_SNAPSHOT))
        grown = {(gpu.node, gpu.node_index): gpu.index for gpu in reader.take().gpus}
        assert len(grown) == 6
        assert {key: grown[key] for key in before} == before
        box_c.kill_raylet()
        stop_node(box_c)
        two_boxes.nodes.remove(box_c)

        def without_c() -> dict[tuple[str, int | None], int]:
            return {(gpu.node, gpu.node_index): gpu.index for gpu in reader.take().gpus}

        # Ray declares the node dead after its health checks (~15 s); its reads time out.
        deadline = time.monotonic() + 120
        after = without_c()
        while len(after) != 4 and time.monotonic() < deadline:
            after = without_c()
        assert after == before  # box C's GPUs are gone, the others' indices unchanged
    finally:
        reader.close()
