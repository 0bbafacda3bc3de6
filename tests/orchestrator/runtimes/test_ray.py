"""RayRuntime on a real local Ray cluster: an engine is a detached, named actor on the node
the spec names, its process dies with its actor (or its node), and a new runtime adopts it."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from dataclasses import replace
from typing import Any, cast

import docker
import httpx
import pytest
import ray
from docker.errors import NotFound

from orchestrator.runtimes.base import LABEL_INSTANCE, EngineSpec, RuntimeError_, RuntimeHandle
from orchestrator.runtimes.ray import NAMESPACE, RayRuntime, ray_gpus_for, readdress
from tests.helpers import docker_engine
from tests.helpers.docker_engine import container_python, python_mounts
from tests.helpers.paths import DUAL_3090_SNAPSHOT, REPO
from tests.helpers.polling import eventually
from tests.helpers.ray_cluster import RayCluster, WorkerBox, connected_cluster
from tests.helpers.runtimes import simulator_spec as runtime_simulator_spec

KEY = "engine-key-for-ray-tests"


@pytest.fixture(scope="module")
def boxes() -> Iterator[RayCluster]:
    workers = [WorkerBox("box-a", 2, DUAL_3090_SNAPSHOT), WorkerBox("box-b", 2, DUAL_3090_SNAPSHOT)]
    with connected_cluster(workers) as cluster:
        yield cluster


def simulator_spec(
    profile_id: str, node_id: str, gpus: tuple[int, ...], share: float
) -> EngineSpec:
    """The simulator on a node (the runtime replaces port 1 with one free there)."""
    return replace(
        runtime_simulator_spec(1, profile_id=profile_id, api_key=KEY),
        runtime="ray",
        env={"PYTHONPATH": str(REPO)},
        node_id=node_id,
        node_gpu_ids=gpus,
        gpu_share=share,
    )


def pid_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


async def serves(handle: RuntimeHandle) -> bool:
    async with httpx.AsyncClient() as client:
        for _ in range(100):
            try:
                response = await client.get(
                    f"{handle.base_url}/v1/models", headers={"Authorization": f"Bearer {KEY}"}
                )
                return response.status_code == 200
            except httpx.TransportError:
                await asyncio.sleep(0.1)
    return False


def test_readdress_moves_the_engine_to_the_node_address() -> None:
    argv = ["vllm", "--host", "127.0.0.1", "--port", "4242", "--x=127.0.0.1:4242", "4242"]
    assert readdress(argv, 4242, "10.0.0.7", 5151) == [
        "vllm", "--host", "10.0.0.7", "--port", "5151", "--x=10.0.0.7:5151", "5151",
    ]  # fmt: skip


def test_ray_gpu_accounting_follows_the_claim() -> None:
    one = simulator_spec("a", "n", (1,), 0.424)
    assert ray_gpus_for(one) == 0.43  # a share of the one GPU, rounded up
    assert ray_gpus_for(simulator_spec("b", "n", (0, 1), 0.8)) == 2.0  # most of both: whole
    assert ray_gpus_for(simulator_spec("c", "n", (0, 1), 0.3)) == 0.0  # Ray has no fraction of two
    assert ray_gpus_for(simulator_spec("d", "n", (), 0.0)) == 0.0


async def test_engine_runs_on_its_node_and_dies_with_its_actor(boxes: RayCluster) -> None:
    runtime = RayRuntime(instance="rt-test")
    box_b = boxes.node("box-b")
    handle = await runtime.start(simulator_spec("tied", box_b.node_id, (1,), 0.5))
    try:
        assert handle.node_id == box_b.node_id
        assert handle.node_gpu_ids == (1,)
        assert handle.pid is not None
        assert pid_alive(handle.pid)
        assert await serves(handle)
        assert await runtime.is_running(handle)
        actor = ray.get_actor(runtime.actor_name("tied"), namespace=NAMESPACE)
        # The actor holds half of one of box B's GPUs in Ray's accounting.
        record = cast("dict[str, Any]", ray.get(actor.record.remote()))
        assert record["ray_gpu_ids"]
        ray.kill(actor, no_restart=True)  # as when its worker process is killed
        pid = handle.pid
        await eventually(lambda: not pid_alive(pid), timeout_s=20)  # it did not outlive it
        assert not await runtime.is_running(handle)
    finally:
        await runtime.stop(handle)


async def test_a_new_runtime_adopts_the_running_engine_and_stops_it(boxes: RayCluster) -> None:
    first = RayRuntime(instance="rt-adopt")
    handle = await first.start(simulator_spec("kept", boxes.node("box-a").node_id, (0,), 0.3))
    assert await serves(handle)
    other_instance = await RayRuntime(instance="rt-someone-else").adopt()
    assert all(h.profile_id != "kept" for h in other_instance)
    adopted = await RayRuntime(instance="rt-adopt").adopt()
    assert [(h.profile_id, h.base_url, h.pid, h.api_key) for h in adopted] == [
        ("kept", handle.base_url, handle.pid, KEY)
    ]
    second = RayRuntime(instance="rt-adopt")
    await second.adopt()
    logs = second.logs_tail(adopted[0], 20)
    assert any("SIMULATOR" in line for line in logs)
    await second.stop(adopted[0], timeout_s=5)
    assert handle.pid is not None
    assert not pid_alive(handle.pid)
    assert await RayRuntime(instance="rt-adopt").adopt() == []
    with pytest.raises(ValueError, match=r"rt-adopt\.kept"):
        ray.get_actor(second.actor_name("kept"), namespace=NAMESPACE)


async def test_start_on_a_node_that_is_not_there_fails_clearly(boxes: RayCluster) -> None:
    runtime = RayRuntime(instance="rt-test")
    with pytest.raises(RuntimeError_, match="not alive"):
        await runtime.start(simulator_spec("nowhere", "ab" * 28, (0,), 0.5))
    assert os.environ.get("GPU_SNAPSHOT") is None  # the driver never read a node's snapshot


def container_spec(profile_id: str, node_id: str, image: str) -> EngineSpec:
    """The simulator in the busybox test image (the host's Python bind-mounted read-only)."""
    mounts = python_mounts(REPO)
    return EngineSpec(
        profile_id=profile_id,
        served_model_name=profile_id,
        runtime="ray",
        node_runtime="docker",
        image=image,
        command=(
            container_python(REPO),
            *("-m", "simulator", "--host", "0.0.0.0", "--port", "8000", "--model", profile_id),
        ),
        env={"PYTHONPATH": str(REPO), "PYTHONDONTWRITEBYTECODE": "1"},
        port=1,  # the actor publishes a port free on its node
        volumes={host: mount["bind"] for host, mount in mounts.items()},
        read_only_volumes=frozenset(mounts),
        ipc_host=False,
        shm_size="64m",
        labels=docker_engine.test_labels(),
        api_key=KEY,
        node_id=node_id,
    )


@pytest.mark.docker
async def test_a_container_engine_runs_through_its_nodes_docker_and_dies_with_its_actor(
    boxes: RayCluster, docker_client: docker.DockerClient, test_image: str
) -> None:
    runtime = RayRuntime(instance="rt-docker")
    spec = container_spec("boxed", boxes.node("box-a").node_id, test_image)
    handle = await runtime.start(spec)
    actor = ray.get_actor(runtime.actor_name("boxed"), namespace=NAMESPACE)
    container_id = str(cast("dict[str, Any]", ray.get(actor.record.remote()))["container"])
    try:
        assert await serves(handle)
        assert await runtime.is_running(handle)
        container = docker_client.containers.get(container_id)
        assert container.labels[LABEL_INSTANCE] == "rt-docker"
        assert any("SIMULATOR" in line for line in runtime.logs_tail(handle, 20))
        ray.kill(actor, no_restart=True)  # as when its worker process is killed

        def removed() -> bool:
            try:
                docker_client.containers.get(container_id)
            except NotFound:
                return True
            return False

        await eventually(removed, timeout_s=30)  # it did not outlive its actor
        assert not await runtime.is_running(handle)
    finally:
        await runtime.stop(handle)
    # A stop removes the container too.
    second = await runtime.start(container_spec("boxed", boxes.node("box-b").node_id, test_image))
    record = cast(
        "dict[str, Any]",
        ray.get(ray.get_actor(runtime.actor_name("boxed"), namespace=NAMESPACE).record.remote()),
    )
    assert await serves(second)
    await runtime.stop(second, timeout_s=5)
    with pytest.raises(NotFound):
        docker_client.containers.get(str(record["container"]))
