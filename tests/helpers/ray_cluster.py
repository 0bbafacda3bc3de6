"""A real Ray cluster on this machine: a head and worker raylets on loopback, each worker
declaring logical GPUs and its own recorded NVML snapshot (`GPU_SNAPSHOT` in its environment).

Every raylet is started with `ray start --block` in its own process group, stopped by
signalling that group, so only this cluster's processes are touched (`ray stop` would end every
raylet of the machine). Each raylet gets its own ports, chosen here, and the workers join one at
a time: raylets started together pick the same free ports and one of them dies on `bind`.
A worker carries a custom resource named after it (`box-a: 1`), so a test knows which Ray node
is which box.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.helpers.ports import free_port

RAY = Path(sys.executable).with_name("ray")
RAY_ENV = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_DISABLE_DOCKER_CPU_WARNING": "1"}
# How long one raylet may take to register with the head (a cold first start on a loaded
# 2-core machine takes several seconds).
NODE_START_TIMEOUT_S = 90.0


@dataclass(frozen=True)
class WorkerBox:
    """One worker node to start: its name, its logical GPUs and its GPU snapshot."""

    name: str
    gpus: int
    snapshot: Path


@dataclass
class RayNode:
    """One raylet this helper started."""

    name: str
    process: subprocess.Popen[bytes]
    node_manager_port: int
    node_id: str = ""

    def raylet_pid(self) -> int | None:
        """The raylet's own pid (a child of `ray start --block`), found by its unique port."""
        marker = f"--node_manager_port={self.node_manager_port}".encode()
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            args = cmdline.split(b"\0")
            if args and args[0].endswith(b"/raylet") and marker in args:
                return int(entry.name)
        return None

    def kill_raylet(self) -> None:
        """SIGKILL this node's raylet alone: the node is lost as when its box dies."""
        pid = self.raylet_pid()
        if pid is None:
            raise RuntimeError(f"no raylet found for node {self.name}")
        os.kill(pid, signal.SIGKILL)


@dataclass
class RayCluster:
    """The head's address and the raylets of this cluster."""

    address: str
    nodes: list[RayNode] = field(default_factory=list)

    def node(self, name: str) -> RayNode:
        """The node started under this name."""
        return next(node for node in self.nodes if node.name == name)


def _node_ports() -> list[str]:
    return [
        f"--node-manager-port={free_port()}",
        f"--object-manager-port={free_port()}",
        f"--metrics-export-port={free_port()}",
        f"--dashboard-agent-listen-port={free_port()}",
        f"--dashboard-agent-grpc-port={free_port()}",
        f"--runtime-env-agent-port={free_port()}",
    ]


def _start(name: str, args: Sequence[str], env: Mapping[str, str]) -> RayNode:
    ports = _node_ports()
    process = subprocess.Popen(
        [str(RAY), "start", "--block", "--disable-usage-stats", *ports, *args],
        env={**os.environ, **RAY_ENV, **env},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    manager_port = int(ports[0].split("=", 1)[1])
    return RayNode(name=name, process=process, node_manager_port=manager_port)


def stop_node(node: RayNode) -> None:
    """Stop one raylet's process group (SIGTERM, then SIGKILL)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(node.process.pid, signal.SIGTERM)
    try:
        node.process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(node.process.pid, signal.SIGKILL)
        node.process.wait(timeout=10)


def alive_nodes(address: str) -> list[dict[str, Any]]:
    """The cluster's live nodes as Ray lists them (read with the `ray` command, so the test
    process itself never becomes a driver)."""
    script = (
        f"import json, ray; ray.init(address={address!r}, log_to_driver=False); "
        "print(json.dumps([n for n in ray.nodes() if n.get('Alive')]))"
    )
    out = subprocess.run(
        [sys.executable, "-c", script],
        env={**os.environ, **RAY_ENV},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if out.returncode != 0:
        return []
    nodes: list[dict[str, Any]] = json.loads(out.stdout.strip().splitlines()[-1])
    return nodes


def _wait_for_nodes(cluster: RayCluster, count: int, timeout_s: float) -> list[dict[str, Any]]:
    deadline = time.monotonic() + timeout_s
    while True:
        nodes = alive_nodes(cluster.address)
        if len(nodes) >= count:
            return nodes
        dead = [node.name for node in cluster.nodes if node.process.poll() is not None]
        if dead or time.monotonic() > deadline:
            why = f"{', '.join(dead)} exited" if dead else f"not within {timeout_s:g}s"
            raise TimeoutError(
                f"the Ray cluster at {cluster.address} did not come up ({len(nodes)} of "
                f"{count} nodes alive; {why}); see the raylet logs under /tmp/ray/session_latest"
            )
        time.sleep(0.5)


def start_worker(cluster: RayCluster, box: WorkerBox) -> RayNode:
    """Start one worker raylet and wait until the head lists it."""
    before = len(cluster.nodes)
    node = _start(
        box.name,
        [
            f"--address={cluster.address}",
            "--num-cpus=1",
            f"--num-gpus={box.gpus}",
            "--node-ip-address=127.0.0.1",
            f"--resources={json.dumps({box.name: 1})}",
        ],
        {"GPU_SNAPSHOT": str(box.snapshot)},
    )
    cluster.nodes.append(node)
    listed = _wait_for_nodes(cluster, before + 1, NODE_START_TIMEOUT_S)
    node.node_id = next(str(n["NodeID"]) for n in listed if box.name in (n.get("Resources") or {}))
    return node


@contextlib.contextmanager
def ray_cluster(workers: Sequence[WorkerBox]) -> Iterator[RayCluster]:
    """A head (no GPUs) and the workers, all alive before it yields; stops only its own."""
    port = free_port()
    cluster = RayCluster(address=f"127.0.0.1:{port}")
    try:
        cluster.nodes.append(
            _start(
                "head",
                [
                    "--head",
                    f"--port={port}",
                    f"--ray-client-server-port={free_port()}",
                    "--num-cpus=1",
                    "--num-gpus=0",
                    "--include-dashboard=false",
                    "--node-ip-address=127.0.0.1",
                ],
                {},
            )
        )
        _wait_for_nodes(cluster, 1, NODE_START_TIMEOUT_S)
        for box in workers:
            start_worker(cluster, box)
        yield cluster
    finally:
        for node in reversed(cluster.nodes):
            stop_node(node)


@contextlib.contextmanager
def connected_cluster(workers: Sequence[WorkerBox]) -> Iterator[RayCluster]:
    """ray_cluster, with this test process joined to it as a driver (left before it stops)."""
    from orchestrator.cluster import connect, disconnect
    from orchestrator.runtimes.ray import NAMESPACE

    with ray_cluster(workers) as cluster:
        connect(cluster.address, NAMESPACE)
        try:
            yield cluster
        finally:
            disconnect()
