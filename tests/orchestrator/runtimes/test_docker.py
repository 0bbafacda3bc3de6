"""DockerRuntime against a real Docker engine: simulator containers from the busybox test image."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import docker
import httpx
import pytest
from docker.errors import NotFound

from orchestrator.runtimes import EngineSpec, RuntimeError_
from orchestrator.runtimes.base import (
    LABEL_INSTANCE,
    LABEL_MANAGED,
    LABEL_PROFILE,
    LABEL_SERVED_NAME,
)
from orchestrator.runtimes.docker import DockerRuntime, container_kwargs
from tests.helpers import docker_engine
from tests.helpers.docker_engine import PID_LABEL, TEST_LABEL, container_python, python_mounts
from tests.helpers.ports import free_port

pytestmark = pytest.mark.docker

SHM_BYTES = 64 * 1024 * 1024


def _instance() -> str:
    """A unique instance name, so no other test's (or session's) container is adopted."""
    return f"t{uuid.uuid4().hex[:8]}"


def _simulator_command(repo_root: Path) -> tuple[str, ...]:
    args = "-m simulator --host 0.0.0.0 --port 8000 --model sim-a"
    return (container_python(repo_root), *args.split())


def _simulator_spec(repo_root: Path, image: str, *, port: int | None = None) -> EngineSpec:
    mounts = python_mounts(repo_root)
    return EngineSpec(
        profile_id="sim-a",
        served_model_name="sim-a",
        runtime="docker",
        image=image,
        command=_simulator_command(repo_root),
        env={
            "PYTHONPATH": str(repo_root),
            "PYTHONDONTWRITEBYTECODE": "1",
            "PYTHONUNBUFFERED": "1",
        },
        port=free_port() if port is None else port,
        volumes={host: mount["bind"] for host, mount in mounts.items()},
        read_only_volumes=frozenset(mounts),
        ipc_host=False,
        shm_size="64m",
        labels=docker_engine.test_labels(),
    )


def _stubborn_spec(image: str) -> EngineSpec:
    """A container that ignores SIGTERM (only SIGKILL ends it)."""
    return EngineSpec(
        profile_id="stubborn",
        served_model_name="stubborn",
        runtime="docker",
        image=image,
        command=("sh", "-c", 'trap "" TERM; echo ready; while true; do sleep 1; done'),
        ipc_host=False,
        shm_size="64m",
        labels=docker_engine.test_labels(),
    )


async def _wait_models(base_url: str, within_s: float = 30.0) -> list[str]:
    deadline = time.monotonic() + within_s
    async with httpx.AsyncClient() as http:
        while True:
            try:
                response = await http.get(base_url + "/v1/models", timeout=2.0)
                if response.status_code == 200:
                    return [m["id"] for m in response.json()["data"]]
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{base_url} not serving after {within_s} s")
            await asyncio.sleep(0.1)


def _gone(client: docker.DockerClient, container_id: str) -> bool:
    try:
        client.containers.get(container_id)
    except NotFound:
        return True
    return False


@pytest.fixture
async def runtime(docker_client: docker.DockerClient) -> AsyncIterator[DockerRuntime]:
    rt = DockerRuntime(instance=_instance(), client=docker_client, gpus_available=False)
    yield rt
    # Whatever a failing test left: this instance's containers go.
    for handle in await rt.adopt():
        await rt.stop(handle, timeout_s=0)


async def test_start_runs_the_expected_container_and_it_serves(
    runtime: DockerRuntime, docker_client: docker.DockerClient, test_image: str, repo_root: Path
) -> None:
    spec = _simulator_spec(repo_root, test_image)
    handle = await runtime.start(spec)
    try:
        assert handle.runtime == "docker"
        assert handle.profile_id == "sim-a"
        assert handle.base_url == f"http://127.0.0.1:{spec.port}"
        attrs: dict[str, Any] = docker_client.api.inspect_container(handle.id)
        assert attrs["Id"] == handle.id
        assert attrs["Name"].startswith(f"/vcg-{runtime.instance}-sim-a-")
        config, host = attrs["Config"], attrs["HostConfig"]
        assert config["Image"] == test_image
        assert config["Cmd"] == list(spec.command)
        assert "PYTHONPATH=" + str(repo_root) in config["Env"]
        assert config["Labels"] == {
            **config["Labels"],
            LABEL_MANAGED: "true",
            LABEL_PROFILE: "sim-a",
            LABEL_INSTANCE: runtime.instance,
            LABEL_SERVED_NAME: "sim-a",
            TEST_LABEL: "1",
            PID_LABEL: docker_engine.test_labels()[PID_LABEL],
        }
        assert host["PortBindings"] == {
            "8000/tcp": [{"HostIp": "127.0.0.1", "HostPort": str(spec.port)}]
        }
        assert attrs["NetworkSettings"]["Ports"]["8000/tcp"] == [
            {"HostIp": "127.0.0.1", "HostPort": str(spec.port)}
        ]
        assert host["Privileged"] is False
        assert host["SecurityOpt"] == ["no-new-privileges"]
        assert host["RestartPolicy"]["Name"] == "no"
        assert not host.get("DeviceRequests")  # no GPU request on a machine without GPUs
        assert host["IpcMode"] != "host"
        assert host["ShmSize"] == SHM_BYTES
        assert sorted(host["Binds"]) == sorted(f"{p}:{p}:ro" for p in spec.volumes)

        assert await _wait_models(handle.base_url) == ["sim-a"]
        assert await runtime.is_running(handle)
        tail = runtime.logs_tail(handle, 50)
        assert any("SIMULATOR starting its HTTP server" in line for line in tail), tail
        assert len(runtime.logs_tail(handle, 1)) == 1
    finally:
        await runtime.stop(handle, timeout_s=10)
    assert _gone(docker_client, handle.id)
    assert not await runtime.is_running(handle)
    # The container is gone; its last lines were kept when it stopped.
    assert any("SIMULATOR" in line for line in runtime.logs_tail(handle, 50))
    await runtime.stop(handle, timeout_s=1)  # already gone: fine


def test_container_kwargs_request_exactly_the_chosen_gpus(repo_root: Path) -> None:
    spec = EngineSpec(
        profile_id="big",
        served_model_name="big-model",
        runtime="docker",
        image="vllm/vllm-openai:v0.9.0",
        command=("--model", "/models/big", "--tensor-parallel-size", "2"),
        port=18000,
        gpu_ids=(0, 1),
        volumes={"/srv/models": "/models", "hf-cache": "/root/.cache/huggingface"},
        read_only_volumes=frozenset({"/srv/models"}),
        labels={"team": "ml"},
    )
    kwargs = container_kwargs(spec, instance="gw1", gpus_available=True)
    requests = kwargs["device_requests"]
    assert len(requests) == 1
    assert requests[0]["Driver"] == "nvidia"
    assert requests[0]["DeviceIDs"] == ["0", "1"]
    assert requests[0]["Capabilities"] == [["gpu"]]
    assert kwargs["image"] == "vllm/vllm-openai:v0.9.0"
    assert kwargs["command"] == ["--model", "/models/big", "--tensor-parallel-size", "2"]
    assert kwargs["ports"] == {"8000/tcp": ("127.0.0.1", 18000)}
    assert kwargs["volumes"] == {
        "/srv/models": {"bind": "/models", "mode": "ro"},
        "hf-cache": {"bind": "/root/.cache/huggingface", "mode": "rw"},
    }
    assert kwargs["ipc_mode"] == "host"
    assert "shm_size" not in kwargs
    assert kwargs["privileged"] is False
    assert kwargs["security_opt"] == ["no-new-privileges"]
    assert kwargs["restart_policy"] == {"Name": "no"}
    assert kwargs["labels"] == {
        "team": "ml",
        LABEL_MANAGED: "true",
        LABEL_PROFILE: "big",
        LABEL_INSTANCE: "gw1",
        LABEL_SERVED_NAME: "big-model",
    }

    # GPUs present but none chosen, or chosen but absent: no request at all.
    no_gpus = EngineSpec(**{**spec.__dict__, "gpu_ids": ()})
    assert "device_requests" not in container_kwargs(no_gpus, instance="gw1", gpus_available=True)
    assert "device_requests" not in container_kwargs(spec, instance="gw1", gpus_available=False)


async def test_stop_kills_a_container_that_ignores_sigterm(
    runtime: DockerRuntime, docker_client: docker.DockerClient, test_image: str
) -> None:
    handle = await runtime.start(_stubborn_spec(test_image))
    deadline = time.monotonic() + 10
    while not any("ready" in line for line in runtime.logs_tail(handle, 5)):
        assert time.monotonic() < deadline, "the container never printed 'ready'"
        await asyncio.sleep(0.05)
    assert handle.base_url.startswith("http://127.0.0.1:")  # Docker picked the host port
    started = time.monotonic()
    await runtime.stop(handle, timeout_s=1)
    elapsed = time.monotonic() - started
    assert _gone(docker_client, handle.id)
    assert 0.9 <= elapsed < 8, f"stop took {elapsed:.2f} s"


async def test_a_new_runtime_of_the_same_instance_adopts_the_container(
    runtime: DockerRuntime, docker_client: docker.DockerClient, test_image: str, repo_root: Path
) -> None:
    spec = _simulator_spec(repo_root, test_image)
    handle = await runtime.start(spec)
    assert await _wait_models(handle.base_url) == ["sim-a"]

    other = DockerRuntime(instance=_instance(), client=docker_client, gpus_available=False)
    assert await other.adopt() == []

    restarted = DockerRuntime(instance=runtime.instance, client=docker_client, gpus_available=False)
    adopted = await restarted.adopt()
    assert adopted == [handle]  # same container id, profile id and base_url
    assert await _wait_models(adopted[0].base_url) == ["sim-a"]
    assert await restarted.is_running(adopted[0])
    await restarted.stop(adopted[0], timeout_s=10)
    assert _gone(docker_client, handle.id)
    assert await restarted.adopt() == []


async def test_start_replaces_an_exited_container_of_the_same_profile(
    runtime: DockerRuntime, docker_client: docker.DockerClient, test_image: str
) -> None:
    first = await runtime.start(_stubborn_spec(test_image))
    docker_client.containers.get(first.id).kill()
    deadline = time.monotonic() + 10
    while await runtime.is_running(first):
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)
    assert await runtime.adopt() == []  # exited containers are not adopted

    second = await runtime.start(_stubborn_spec(test_image))
    assert second.id != first.id
    assert _gone(docker_client, first.id)
    await runtime.stop(second, timeout_s=0)
    assert _gone(docker_client, second.id)


async def test_a_missing_image_is_not_pulled(runtime: DockerRuntime, repo_root: Path) -> None:
    spec = EngineSpec(
        **{**_simulator_spec(repo_root, "vcg-test-missing:never").__dict__, "profile_id": "nope"}
    )
    with pytest.raises(RuntimeError_, match=r"docker pull vcg-test-missing:never"):
        await runtime.start(spec)
    assert await runtime.adopt() == []


async def test_no_docker_engine_is_a_clear_runtime_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("DOCKER_HOST", f"unix://{tmp_path}/no-docker.sock")
    rt = DockerRuntime(instance=_instance(), gpus_available=False)
    with pytest.raises(RuntimeError_, match="no Docker engine is reachable"):
        await rt.adopt()
    rt.close()


async def test_the_client_is_created_from_the_environment(
    docker_client: docker.DockerClient,
) -> None:
    rt = DockerRuntime(instance=_instance(), gpus_available=False)
    try:
        assert await rt.adopt() == []
    finally:
        rt.close()
