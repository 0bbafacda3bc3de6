"""VLLMModelManager switching real Docker containers: simulator engines from the busybox image.

The profiles are written as a YAML file and loaded like the gateway loads them; specs come from
the planner and ``build_engine_spec`` as in ``gateway.engine.ModelControl.spec_for``. Each
container runs the host's Python through read-only bind mounts (``python_mounts``) and is
labelled for the session cleanup (``docker_engine.test_labels``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import docker
import httpx
import pytest
import yaml
from docker.errors import NotFound

from orchestrator.gpus import GpuInventory
from orchestrator.manager import (
    EngineBusy,
    EngineState,
    JobStatus,
    SpecFactory,
    SwitchJob,
    VLLMModelManager,
)
from orchestrator.planner import plan_profile
from orchestrator.profiles import ProfileSet, load_profiles
from orchestrator.runtimes.base import LABEL_INSTANCE, LABEL_PROFILE, EngineSpec
from orchestrator.runtimes.docker import DockerRuntime
from orchestrator.specs import build_engine_spec
from tests.helpers import docker_engine
from tests.helpers.docker_engine import python_mounts
from tests.helpers.ports import free_port
from tests.helpers.simulator_container import simulator_docker_profile

pytestmark = pytest.mark.docker

NO_GPU = GpuInventory(gpus=(), source="test", reason="no GPU in this test")
JOB_TIMEOUT_S = 45.0


@dataclass(frozen=True)
class Setup:
    """One test's instance name, profiles, spec factory and clients."""

    instance: str
    profiles: ProfileSet
    spec_factory: SpecFactory
    docker: docker.DockerClient
    http: httpx.AsyncClient

    def manager(self) -> VLLMModelManager:
        """A manager (with a fresh DockerRuntime) for this test's instance."""
        runtime = DockerRuntime(
            instance=self.instance, client=self.docker, gpus_available=False, stop_timeout_s=5
        )
        return VLLMModelManager(
            http=self.http,
            runtimes={"docker": runtime},
            spec_factory=self.spec_factory,
            poll_interval_s=0.1,
        )

    def containers(
        self, profile_id: str | None = None, *, include_exited: bool = False
    ) -> list[Any]:
        """This instance's containers (running only unless `include_exited`), of one profile."""
        labels = [f"{LABEL_INSTANCE}={self.instance}"]
        if profile_id is not None:
            labels.append(f"{LABEL_PROFILE}={profile_id}")
        found: list[Any] = self.docker.containers.list(
            all=include_exited, filters={"label": labels}, ignore_removed=True
        )
        return found


def _spec_factory(profiles: ProfileSet, instance: str) -> SpecFactory:
    """Like ModelControl.spec_for, on a machine without GPUs, with the test labels added."""

    def spec_for(profile_id: str) -> EngineSpec:
        profile = profiles.get(profile_id)
        spec = build_engine_spec(
            profile,
            plan_profile(profile, NO_GPU),
            port=free_port(),
            vllm_python="python3",
            hf_cache=None,
            hf_token=None,
            log_dir=None,
            instance=instance,
        )
        return dataclasses.replace(spec, labels={**spec.labels, **docker_engine.test_labels()})

    return spec_for


@pytest.fixture
def profiles(tmp_path: Path, test_image: str, repo_root: Path) -> ProfileSet:
    """dock-a and dock-b serve; dock-broken fails while "loading" like an engine out of memory."""
    data = {
        "default": "dock-a",
        "profiles": {
            "dock-a": simulator_docker_profile(test_image, repo_root, "dock-a"),
            "dock-b": simulator_docker_profile(test_image, repo_root, "dock-b"),
            # The delay keeps the container up until the runtime has read its port.
            "dock-broken": simulator_docker_profile(
                test_image, repo_root, "dock-broken", "--startup-delay", "0.5", "--fail-at-start"
            ),
        },
    }
    path = tmp_path / "model_profiles.yml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return load_profiles(path)


@pytest.fixture
def instance(docker_client: docker.DockerClient) -> Iterator[str]:
    """A unique instance name; whatever containers of it a test leaves are removed."""
    name = f"sw{uuid.uuid4().hex[:8]}"
    yield name
    leftovers = docker_client.containers.list(
        all=True, filters={"label": f"{LABEL_INSTANCE}={name}"}, ignore_removed=True
    )
    for container in leftovers:
        try:
            container.remove(force=True)
        except NotFound:
            continue


@pytest.fixture
async def setup(
    profiles: ProfileSet, instance: str, docker_client: docker.DockerClient
) -> AsyncIterator[Setup]:
    """Profiles, spec factory and clients for this test's instance."""
    async with httpx.AsyncClient() as http:
        yield Setup(
            instance=instance,
            profiles=profiles,
            spec_factory=_spec_factory(profiles, instance),
            docker=docker_client,
            http=http,
        )


async def _switch(manager: VLLMModelManager, profile_id: str) -> SwitchJob:
    job = manager.request_switch(profile_id, exclusive=True)
    return await manager.wait_job(job.id, timeout_s=JOB_TIMEOUT_S)


def _engine_headers(manager: VLLMModelManager) -> dict[str, str]:
    """The Authorization header the manager's engine requires (the key of its start)."""
    assert manager.spec is not None
    assert manager.spec.api_key
    return {"Authorization": f"Bearer {manager.spec.api_key}"}


async def _chat(setup: Setup, manager: VLLMModelManager, name: str) -> str:
    """One chat completion through the manager's ready engine; returns the reply text."""
    async with manager.serving() as status:
        assert status.base_url is not None
        response = await setup.http.post(
            status.base_url + "/v1/chat/completions",
            json={"model": name, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8},
            headers=_engine_headers(manager),
            timeout=10.0,
        )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model"] == name
    content = body["choices"][0]["message"]["content"]
    assert isinstance(content, str)
    assert content
    return content


def _gone(client: docker.DockerClient, container_id: str) -> bool:
    try:
        client.containers.get(container_id)
    except NotFound:
        return True
    return False


async def test_switch_runs_one_locked_down_container_that_serves(
    setup: Setup, repo_root: Path
) -> None:
    manager = setup.manager()
    try:
        job = await _switch(manager, "dock-a")
        assert job.status is JobStatus.SUCCEEDED, job.error
        assert job.previous_profile_id is None
        status = manager.status()
        assert (status.state, status.profile_id) == (EngineState.READY, "dock-a")
        assert status.served_names == ("dock-a",)
        await _chat(setup, manager, "dock-a")

        running = setup.containers()
        assert [c.labels[LABEL_PROFILE] for c in running] == ["dock-a"]
        assert manager.handle is not None
        assert running[0].id == manager.handle.id
        attrs: dict[str, Any] = setup.docker.api.inspect_container(running[0].id)
        host = attrs["HostConfig"]
        spec = manager.spec
        assert spec is not None
        assert host["PortBindings"] == {
            "8000/tcp": [{"HostIp": "127.0.0.1", "HostPort": str(spec.port)}]
        }
        assert manager.base_url == f"http://127.0.0.1:{spec.port}"
        assert host["Privileged"] is False
        assert "no-new-privileges" in host["SecurityOpt"]
        assert host["RestartPolicy"]["Name"] == "no"
        mounts = python_mounts(repo_root)
        assert sorted(host["Binds"]) == sorted(f"{p}:{p}:ro" for p in mounts)
        assert all(mount["RW"] is False for mount in attrs["Mounts"])
        # The engine's API key: in its environment, in no label and not on its command line.
        assert spec.api_key
        assert f"VLLM_API_KEY={spec.api_key}" in attrs["Config"]["Env"]
        assert not any(spec.api_key in value for value in attrs["Config"]["Labels"].values())
        assert not any(spec.api_key in arg for arg in attrs["Config"]["Cmd"] or [])
        # Straight to the published port, the engine wants that key: 401 without or with another.
        url = f"{manager.base_url}/v1/models"
        assert (await setup.http.get(url)).status_code == 401
        other = {"Authorization": "Bearer not-the-key"}
        assert (await setup.http.get(url, headers=other)).status_code == 401
        keyed = await setup.http.get(url, headers=_engine_headers(manager))
        assert keyed.status_code == 200
        assert (await setup.http.get(f"{manager.base_url}/health")).status_code == 200
    finally:
        await manager.aclose()
    assert setup.containers(include_exited=True) == []


async def test_switch_replaces_the_container_of_the_previous_profile(setup: Setup) -> None:
    manager = setup.manager()
    try:
        first = await _switch(manager, "dock-a")
        assert first.status is JobStatus.SUCCEEDED, first.error
        assert manager.handle is not None
        old_id = manager.handle.id

        second = await _switch(manager, "dock-b")
        assert second.status is JobStatus.SUCCEEDED, second.error
        assert second.previous_profile_id == "dock-a"
        assert _gone(setup.docker, old_id)
        running = setup.containers()
        assert [c.labels[LABEL_PROFILE] for c in running] == ["dock-b"]
        assert manager.handle is not None
        assert running[0].id == manager.handle.id
        assert manager.status().profile_id == "dock-b"
        await _chat(setup, manager, "dock-b")
    finally:
        await manager.aclose()


async def test_a_restarted_manager_adopts_the_running_container(setup: Setup) -> None:
    before = setup.manager()
    after: VLLMModelManager | None = None
    try:
        job = await _switch(before, "dock-b")
        assert job.status is JobStatus.SUCCEEDED, job.error
        assert before.handle is not None
        container_id = before.handle.id
        started_at = setup.docker.api.inspect_container(container_id)["State"]["StartedAt"]

        # The gateway restarts: a new manager and runtime of the same instance, nothing stopped.
        after = setup.manager()
        adopted = await after.adopt(lambda profile_id: setup.spec_factory(profile_id))
        assert adopted is not None
        assert (adopted.state, adopted.profile_id) == (EngineState.READY, "dock-b")
        assert after.handle is not None
        assert after.handle.id == container_id
        assert after.base_url == before.base_url
        state = setup.docker.api.inspect_container(container_id)["State"]
        assert state["Running"] is True
        assert state["StartedAt"] == started_at  # the same run: not restarted
        assert [c.id for c in setup.containers()] == [container_id]
        # The key was read back from the container: the new spec's own key would be refused.
        assert before.spec is not None
        assert after.spec is not None
        assert after.spec.api_key == before.spec.api_key
        assert setup.spec_factory("dock-b").api_key != before.spec.api_key
        await _chat(setup, after, "dock-b")
    finally:
        if after is not None:
            await after.aclose()
        await before.aclose()
    assert setup.containers(include_exited=True) == []


async def test_an_engine_that_dies_while_loading_is_rolled_back(setup: Setup) -> None:
    manager = setup.manager()
    try:
        first = await _switch(manager, "dock-a")
        assert first.status is JobStatus.SUCCEEDED, first.error
        assert manager.handle is not None
        old_id = manager.handle.id

        job = await _switch(manager, "dock-broken")
        assert job.status is JobStatus.ROLLED_BACK, job.error
        assert job.error is not None
        assert "engine exited" in job.error
        assert any("out of memory" in line for line in job.logs), job.logs
        assert job.finished_at is not None

        status = manager.status()
        assert (status.state, status.profile_id) == (EngineState.READY, "dock-a")
        assert manager.handle is not None
        assert manager.handle.id != old_id  # a new dock-a container
        assert _gone(setup.docker, old_id)
        assert setup.containers("dock-broken", include_exited=True) == []
        assert [c.id for c in setup.containers(include_exited=True)] == [manager.handle.id]
        await _chat(setup, manager, "dock-a")
    finally:
        await manager.aclose()


async def test_concurrent_switch_requests_accept_exactly_one(setup: Setup) -> None:
    manager = setup.manager()
    try:

        async def attempt(profile_id: str) -> SwitchJob | EngineBusy:
            try:
                return manager.request_switch(profile_id, exclusive=True)
            except EngineBusy as exc:
                return exc

        results = await asyncio.gather(*(attempt(("dock-a", "dock-b")[i % 2]) for i in range(10)))
        accepted = [r for r in results if isinstance(r, SwitchJob)]
        refused = [r for r in results if isinstance(r, EngineBusy)]
        assert len(accepted) == 1
        assert len(refused) == 9
        job = accepted[0]
        assert all(busy.job_id == job.id for busy in refused)
        assert all(f"a switch to {job.profile_id} is already running" in str(b) for b in refused)

        done = await manager.wait_job(job.id, timeout_s=JOB_TIMEOUT_S)
        assert done.status is JobStatus.SUCCEEDED, done.error
        running = setup.containers()
        assert [c.labels[LABEL_PROFILE] for c in running] == [job.profile_id]
    finally:
        await manager.aclose()
    assert setup.containers(include_exited=True) == []
