"""The fleet's nodes on a Ray cluster (`RAY_ADDRESS`): one small actor per node reads its GPUs.

Ray does membership, failure detection and GPU accounting; this module only asks it which nodes
are alive and has a `NodeInventory` actor on each node (pinned there by node affinity: on one
machine every raylet has the same address)
read that node's GPUs: through NVML, or from the recorded snapshot named by `GPU_SNAPSHOT` in
the environment the node's `ray start` ran with (for tests and for planning a cluster that is
not there yet). Groundwork for the cluster issue: runtimes and placement across nodes build on
`cluster_inventory`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from orchestrator.gpus import GpuInventory, gpu_reader, inventory_from_dict

SNAPSHOT_ENV = "GPU_SNAPSHOT"


@dataclass(frozen=True)
class NodeGpus:
    """One live Ray node and the GPUs it reads."""

    node_id: str
    address: str
    inventory: GpuInventory


@ray.remote(num_cpus=0)
class NodeInventory:
    """Reads the GPUs of the node it runs on."""

    def read(self) -> dict[str, Any]:
        """The node's inventory as data (NVML, or the node's GPU_SNAPSHOT)."""
        snapshot = os.environ.get(SNAPSHOT_ENV)
        inventory = gpu_reader(Path(snapshot) if snapshot else None).read()
        return inventory.to_dict()


def live_nodes() -> list[dict[str, Any]]:
    """Ray's view of the cluster's live nodes (the driver must be connected)."""
    nodes: list[dict[str, Any]] = ray.nodes()  # type: ignore[no-untyped-call]
    return [node for node in nodes if node.get("Alive")]


def cluster_inventory(timeout_s: float = 30.0) -> list[NodeGpus]:
    """Every live node's GPUs, read on that node; nodes without GPUs included (empty)."""
    found: list[NodeGpus] = []
    readers = []
    for node in live_nodes():
        node_id = str(node["NodeID"])
        pinned = NodeAffinitySchedulingStrategy(node_id=node_id, soft=False)
        reader = NodeInventory.options(scheduling_strategy=pinned).remote()  # type: ignore[attr-defined]
        readers.append((node_id, str(node["NodeManagerAddress"]), reader))
    for node_id, address, reader in readers:
        data = ray.get(reader.read.remote(), timeout=timeout_s)
        ray.kill(reader)
        found.append(
            NodeGpus(
                node_id=node_id,
                address=address,
                inventory=inventory_from_dict(data, source=f"ray node {node_id[:12]}"),
            )
        )
    return found
