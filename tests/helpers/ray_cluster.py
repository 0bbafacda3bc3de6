"""A real Ray cluster on this machine: a head and worker raylets on loopback, each worker
declaring logical GPUs and its own recorded NVML snapshot (`GPU_SNAPSHOT` in its environment).

Every process is started with `ray start --block` and stopped by signalling that process group,
so only this cluster's processes are touched (`ray stop` would end every raylet of the machine).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tests.helpers.ports import free_port

RAY = Path(sys.executable).with_name("ray")
_ENV = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_DISABLE_DOCKER_CPU_WARNING": "1"}


@dataclass
class RayCluster:
    """The head's address and the processes of its raylets."""

    address: str
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)


def _start(args: Sequence[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [str(RAY), "start", "--block", "--disable-usage-stats", *args],
        env={**os.environ, **_ENV, **env},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


def _stop(process: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)


@contextlib.contextmanager
def ray_cluster(
    workers: Sequence[tuple[int, Path]], timeout_s: float = 60.0
) -> Iterator[RayCluster]:
    """A head (no GPUs) and one worker per (GPU count, snapshot), all alive before it yields."""
    import ray

    port = free_port()
    cluster = RayCluster(address=f"127.0.0.1:{port}")
    try:
        cluster.processes.append(
            _start(
                [
                    "--head",
                    f"--port={port}",
                    "--num-cpus=1",
                    "--num-gpus=0",
                    "--include-dashboard=false",
                    "--node-ip-address=127.0.0.1",
                ],
                {},
            )
        )
        for gpus, snapshot in workers:
            cluster.processes.append(
                _start(
                    [
                        f"--address={cluster.address}",
                        "--num-cpus=1",
                        f"--num-gpus={gpus}",
                        "--node-ip-address=127.0.0.1",
                    ],
                    {"GPU_SNAPSHOT": str(snapshot)},
                )
            )
        ray.init(address=cluster.address, namespace="vcg-tests", log_to_driver=False)
        deadline = time.monotonic() + timeout_s
        while len([n for n in ray.nodes() if n.get("Alive")]) < 1 + len(workers):  # type: ignore[no-untyped-call]
            if time.monotonic() > deadline:
                raise TimeoutError(f"the Ray cluster at {cluster.address} did not come up")
            time.sleep(0.5)
        yield cluster
    finally:
        ray.shutdown()
        for process in reversed(cluster.processes):
            _stop(process)
