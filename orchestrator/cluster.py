"""The fleet's nodes on a Ray cluster (`RAY_ADDRESS`): one small actor per node reads its GPUs.

Ray does membership, failure detection and GPU accounting; this module only asks it which nodes
are alive and has a `NodeInventory` actor on each node (pinned there by node affinity: on one
machine every raylet has the same address) read that node's GPUs: through NVML, or from the
recorded snapshot named by `GPU_SNAPSHOT` in the environment the node's `ray start` ran with
(for tests and for planning a cluster that is not there yet).

`ClusterGpuReader` merges the nodes' readings into one inventory: each GPU keeps its index on
its node (`node_index`) and gets an index in the whole cluster (`index`, what the ledger and
placements use) and its node's id (`node`). Placement keeps an engine's GPUs on one node.

Every call here blocks (Ray's API is synchronous): async callers run them in a thread.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import ray
import structlog
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from orchestrator.gpus import GpuInfo, GpuInventory, gpu_reader, inventory_from_dict

log = structlog.get_logger(__name__)

SNAPSHOT_ENV = "GPU_SNAPSHOT"
# How long one node may take to answer an inventory read before it is listed without GPUs.
READ_TIMEOUT_S = 15.0


@dataclass(frozen=True)
class NodeGpus:
    """One live Ray node and the GPUs it reads."""

    node_id: str
    address: str
    hostname: str
    inventory: GpuInventory
    ray_gpus: float = 0.0  # the GPUs its `ray start` declared (Ray's accounting)


@ray.remote(num_cpus=0)
class NodeInventory:
    """Reads the GPUs of the node it runs on."""

    def read(self) -> dict[str, Any]:
        """The node's inventory as data (NVML, or the node's GPU_SNAPSHOT)."""
        snapshot = os.environ.get(SNAPSHOT_ENV)
        inventory = gpu_reader(Path(snapshot) if snapshot else None).read()
        return inventory.to_dict()


def connect(address: str, namespace: str) -> None:
    """Join the cluster at `address` as a driver (once per process)."""
    if not ray.is_initialized():
        ray.init(
            address=address,
            namespace=namespace,
            log_to_driver=False,
            configure_logging=False,
        )


def disconnect() -> None:
    """Leave the cluster (detached actors, the engines, keep running)."""
    if ray.is_initialized():
        ray.shutdown()


def own_node_id() -> str:
    """The node this driver runs on."""
    return str(ray.get_runtime_context().get_node_id())


def live_nodes() -> list[dict[str, Any]]:
    """Ray's view of the cluster's live nodes (the driver must be connected)."""
    nodes: list[dict[str, Any]] = ray.nodes()  # type: ignore[no-untyped-call]
    return [node for node in nodes if node.get("Alive")]


class ClusterGpuReader:
    """The whole cluster's GPUs as one inventory (a GpuReader), read on each node.

    Keeps one inventory actor per node between readings (starting an actor takes a worker
    process); an actor whose node died is dropped with it. Once started, a thread re-reads the
    cluster every `interval_s` and `read()` returns the latest reading without waiting: a node
    that stops answering (lost, not yet declared dead by Ray) must not hold up the gateway.
    A node's GPUs keep their cluster-wide indices for as long as the gateway runs, so a claim
    on a lost node's GPUs never names another node's.
    """

    def __init__(self, timeout_s: float = READ_TIMEOUT_S, interval_s: float = 1.0) -> None:
        self._timeout_s = timeout_s
        self._interval_s = interval_s
        self._readers: dict[str, Any] = {}
        self._bases: dict[str, tuple[int, int]] = {}  # node -> (first index, GPU count)
        self._next_index = 0
        self._lock = threading.Lock()
        self._latest: GpuInventory | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @classmethod
    def connect(cls, address: str, namespace: str) -> ClusterGpuReader:
        """Join the cluster at `address` as a driver; a reader of its GPUs."""
        connect(address, namespace)
        return cls()

    @staticmethod
    def own_node_id() -> str:
        """The node this driver runs on."""
        return own_node_id()

    @staticmethod
    def disconnect() -> None:
        """Leave the cluster (detached actors, the engines, keep running)."""
        disconnect()

    def nodes(self) -> list[NodeGpus]:
        """Every live node's GPUs; a node that does not answer is listed with the reason."""
        with self._lock:
            live = live_nodes()
            alive = {str(node["NodeID"]) for node in live}
            for gone in set(self._readers) - alive:
                del self._readers[gone]
            pending = []
            for node in live:
                node_id = str(node["NodeID"])
                reader = self._readers.get(node_id)
                if reader is None:
                    pinned = NodeAffinitySchedulingStrategy(node_id=node_id, soft=False)
                    reader = NodeInventory.options(  # type: ignore[attr-defined]
                        scheduling_strategy=pinned
                    ).remote()
                    self._readers[node_id] = reader
                pending.append((node, reader.read.remote()))
            found = []
            for node, ref in pending:
                node_id = str(node["NodeID"])
                source = f"ray node {node_id[:12]}"
                try:
                    inventory = inventory_from_dict(
                        ray.get(ref, timeout=self._timeout_s), source=source
                    )
                except Exception as exc:  # a node lost mid-read, or a broken snapshot there
                    self._readers.pop(node_id, None)
                    log.warning("cluster_node_unread", node=node_id, reason=str(exc))
                    inventory = GpuInventory(
                        gpus=(), source=source, reason=f"not read: {type(exc).__name__}: {exc}"
                    )
                found.append(
                    NodeGpus(
                        node_id=node_id,
                        address=str(node["NodeManagerAddress"]),
                        hostname=str(node.get("NodeManagerHostname") or ""),
                        inventory=inventory,
                        ray_gpus=float((node.get("Resources") or {}).get("GPU", 0.0)),
                    )
                )
            return found

    def _base(self, node: NodeGpus) -> int:
        known = self._bases.get(node.node_id)
        if known is None or known[1] < node.inventory.count:
            known = (self._next_index, node.inventory.count)
            self._bases[node.node_id] = known
            self._next_index += node.inventory.count
        return known[0]

    def take(self) -> GpuInventory:
        """Read the cluster now (blocks up to the read timeout)."""
        try:
            nodes = self.nodes()
        except Exception as exc:  # the cluster cannot be reached
            return GpuInventory(gpus=(), source="ray", reason=f"Ray cluster unreachable: {exc}")
        reading = merge(nodes, {node.node_id: self._base(node) for node in nodes})
        self._latest = reading
        return reading

    def read(self) -> GpuInventory:
        """The latest reading (GpuReader); taken now when there is none yet."""
        latest = self._latest
        return latest if latest is not None and self._thread is not None else self.take()

    def start(self) -> None:
        """Take a first reading, then keep re-reading in a thread."""
        self.take()
        self._thread = threading.Thread(target=self._run, name="ray-inventory", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self._interval_s):
            try:
                self.take()
            except Exception as exc:  # keep reading; the next round may succeed
                log.warning("cluster_read_failed", reason=str(exc))

    def close(self) -> None:
        """Stop reading and stop the inventory actors."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self._timeout_s + 5)
        with self._lock:
            for reader in self._readers.values():
                try:
                    ray.kill(reader)
                except Exception as exc:  # its node is gone already
                    log.debug("cluster_reader_kill_failed", reason=str(exc))
            self._readers.clear()


def merge(nodes: list[NodeGpus], bases: dict[str, int]) -> GpuInventory:
    """One inventory of every node's GPUs: each GPU names its node and its index there, and
    gets the cluster-wide index `bases[node] + its index on the node`."""
    gpus: list[GpuInfo] = []
    for node in sorted(nodes, key=lambda n: bases[n.node_id]):
        for position, gpu in enumerate(node.inventory.gpus):
            gpus.append(
                replace(
                    gpu,
                    index=bases[node.node_id] + position,
                    node=node.node_id,
                    node_index=gpu.index,
                )
            )
    described = [
        {
            "node_id": node.node_id,
            "address": node.address,
            "hostname": node.hostname,
            "gpus": node.inventory.count,
            "ray_gpus": node.ray_gpus,
            "source": node.inventory.source,
            "reason": node.inventory.reason,
        }
        for node in nodes
    ]
    with_gpus = [node for node in nodes if node.inventory.count]
    reason = None if gpus else "no node of the Ray cluster has a GPU"
    return GpuInventory(
        gpus=tuple(gpus),
        source=f"ray: {len(nodes)} nodes, {len(with_gpus)} with GPUs",
        reason=reason,
        driver_version=next(
            (n.inventory.driver_version for n in with_gpus if n.inventory.driver_version), None
        ),
        extra={"nodes": described},
    )
