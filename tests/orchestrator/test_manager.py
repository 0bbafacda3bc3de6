"""VLLMModelManager driving real engine processes (the simulator) through its state machine."""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import AsyncIterator

import httpx
import pytest

from orchestrator.manager import (
    ALLOWED_TRANSITIONS,
    EngineBusy,
    EngineEvent,
    EngineState,
    InvalidTransition,
    VLLMModelManager,
)
from orchestrator.runtimes import EngineSpec, ExternalRuntime, ProcessRuntime, RuntimeError_
from orchestrator.runtimes.external import engine_root_url
from tests.infra.ports import free_port
from tests.infra.processes import pid_alive


def _simulator_spec(port: int, *extra: str, timeout_s: float = 30.0) -> EngineSpec:
    return EngineSpec(
        profile_id="sim",
        served_model_name="sim-model",
        runtime="process",
        command=(
            sys.executable,
            "-m",
            "simulator",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--model",
            "sim-model",
            *extra,
        ),
        port=port,
        startup_timeout_s=timeout_s,
    )


def _no_profiles(profile_id: str) -> EngineSpec:
    raise KeyError(profile_id)


@pytest.fixture
async def manager() -> AsyncIterator[VLLMModelManager]:
    async with httpx.AsyncClient() as http:
        mgr = VLLMModelManager(
            http=http,
            runtimes={"process": ProcessRuntime(), "external": ExternalRuntime()},
            spec_factory=_no_profiles,
            poll_interval_s=0.05,
        )
        try:
            yield mgr
        finally:
            await mgr.aclose()


async def _collect(manager: VLLMModelManager, into: list[EngineEvent]) -> None:
    async for event in manager.subscribe():
        into.append(event)


async def test_start_probe_stop_a_real_process(manager: VLLMModelManager) -> None:
    events: list[EngineEvent] = []
    watcher = asyncio.create_task(_collect(manager, events))
    await asyncio.sleep(0)
    status = await manager.start(_simulator_spec(free_port()))
    assert status.state is EngineState.READY, status.error
    assert status.served_model_name == "sim-model"
    health = await manager.probe()
    assert health.ok
    assert health.latency_ms is not None
    async with httpx.AsyncClient() as client:
        models = (await client.get(f"{manager.base_url}/v1/models")).json()
    assert models["data"][0]["id"] == "sim-model"
    assert manager.handle is not None
    pid = int(manager.handle.id)
    stopped = await manager.stop()
    assert stopped.state is EngineState.IDLE
    assert not pid_alive(pid)
    await asyncio.sleep(0.05)
    watcher.cancel()
    assert [e.state for e in events] == [
        EngineState.STARTING,
        EngineState.LOADING,
        EngineState.READY,
        EngineState.DRAINING,
        EngineState.STOPPING,
        EngineState.IDLE,
    ]


async def test_engine_that_fails_at_start_ends_failed_with_its_logs(
    manager: VLLMModelManager,
) -> None:
    status = await manager.start(_simulator_spec(free_port(), "--fail-at-start"))
    assert status.state is EngineState.FAILED
    assert status.error
    assert "exited during startup" in status.error
    health = await manager.probe()
    assert not health.ok
    assert health.state is EngineState.FAILED
    # A failed engine can be started again (FAILED -> STARTING is allowed).
    retry = await manager.start(_simulator_spec(free_port()))
    assert retry.state is EngineState.READY


async def test_startup_timeout_fails_and_kills_the_process(manager: VLLMModelManager) -> None:
    spec = _simulator_spec(free_port(), "--startup-delay", "30", timeout_s=1.0)
    status = await manager.start(spec)
    assert status.state is EngineState.FAILED
    assert status.error
    assert "not serving after" in status.error
    assert manager.base_url is None


async def test_concurrent_start_is_refused(manager: VLLMModelManager) -> None:
    first = asyncio.create_task(manager.start(_simulator_spec(free_port(), "--startup-delay", "1")))
    await asyncio.sleep(0.1)
    with pytest.raises(EngineBusy):
        await manager.start(_simulator_spec(free_port()))
    assert (await first).state is EngineState.READY


async def test_unknown_runtime_fails_cleanly(manager: VLLMModelManager) -> None:
    spec = EngineSpec(profile_id="x", served_model_name="x", runtime="kubernetes")
    with pytest.raises(RuntimeError_, match="unknown runtime 'kubernetes'"):
        await manager.start(spec)
    # A spec that cannot run is refused before anything changes.
    assert manager.state is EngineState.IDLE


async def test_external_runtime_adopts_a_running_engine(manager: VLLMModelManager) -> None:
    port = free_port()
    process = await asyncio.create_subprocess_exec(
        *_simulator_spec(port).command,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        spec = EngineSpec(
            profile_id="ext",
            served_model_name="sim-model",
            runtime="external",
            base_url=f"http://127.0.0.1:{port}/v1",
            startup_timeout_s=30,
        )
        status = await manager.start(spec)
        assert status.state is EngineState.READY
        assert status.base_url == f"http://127.0.0.1:{port}"
        await manager.stop()
        # Stopping an adopted engine leaves the process alone.
        assert process.returncode is None
    finally:
        process.terminate()
        await process.wait()


def test_transition_table_has_no_dead_ends() -> None:
    for state in EngineState:
        assert ALLOWED_TRANSITIONS[state], f"{state} has no way out"
    assert EngineState.READY not in ALLOWED_TRANSITIONS[EngineState.IDLE]
    # A ready engine is always drained before it is stopped.
    assert ALLOWED_TRANSITIONS[EngineState.READY] == {EngineState.DRAINING, EngineState.FAILED}


async def test_invalid_transition_raises(manager: VLLMModelManager) -> None:
    with pytest.raises(InvalidTransition):
        manager._enter(EngineState.READY, "skipping STARTING is not allowed")


def test_engine_root_url_strips_v1() -> None:
    assert engine_root_url("http://h:8000/v1") == "http://h:8000"
    assert engine_root_url("http://h:8000/v1/") == "http://h:8000"
    assert engine_root_url("http://h:8000") == "http://h:8000"


async def test_adopt_skips_a_docker_runtime_whose_daemon_is_down(
    tmp_path: os.PathLike[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A socket file left behind by a dead dockerd must not stop the gateway from starting."""
    import socket
    from pathlib import Path

    from orchestrator.runtimes.docker import DockerRuntime

    sock_path = Path(tmp_path) / "docker.sock"
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(str(sock_path))
    dead.close()  # the file stays; connecting to it is refused, like a crashed daemon's socket
    monkeypatch.setenv("DOCKER_HOST", f"unix://{sock_path}")
    docker_rt = DockerRuntime(instance="dead-daemon-test", gpus_available=False)
    with pytest.raises(RuntimeError_, match="refuses connections"):
        await docker_rt.adopt()
    async with httpx.AsyncClient() as http:
        mgr = VLLMModelManager(
            http=http,
            runtimes={"docker": docker_rt, "process": ProcessRuntime()},
            spec_factory=_no_profiles,
        )
        try:
            assert await mgr.adopt(lambda _pid: None) is None
            assert mgr.status().state is EngineState.IDLE
        finally:
            await mgr.aclose()
