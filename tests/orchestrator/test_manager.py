"""VLLMModelManager driving real engine processes (the simulator) through its state machine."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import re
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from orchestrator.manager import (
    ALLOWED_TRANSITIONS,
    EngineBusy,
    EngineEvent,
    EngineNotStopped,
    EngineState,
    InvalidTransition,
    JobStatus,
    VLLMModelManager,
)
from orchestrator.runtimes import (
    EngineSpec,
    ExternalRuntime,
    ProcessRuntime,
    RuntimeError_,
)
from orchestrator.runtimes.external import engine_root_url
from tests.helpers.ports import free_port
from tests.helpers.processes import pid_alive
from tests.helpers.runtimes import StopFailsRuntime
from tests.helpers.runtimes import simulator_spec as _simulator_spec


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


DESIGN_MD = Path(__file__).resolve().parents[2] / "orchestrator" / "DESIGN.md"
_EDGE_ROW = re.compile(r"^\|\s*([A-Z]+)\s*\|\s*([A-Z]+)\s*\|\s*(.*?)\s*\|\s*$")


def _documented_edges() -> list[tuple[str, str, str]]:
    """(from, to, when) rows of DESIGN.md's transition list, between its two markers."""
    text = DESIGN_MD.read_text()
    start = text.index("<!-- transitions:start -->")
    end = text.index("<!-- transitions:end -->", start)
    rows = []
    for line in text[start:end].splitlines():
        match = _EDGE_ROW.match(line)
        if match:
            rows.append((match[1], match[2], match[3]))
    return rows


def test_design_md_lists_exactly_the_allowed_transitions() -> None:
    """The document and the table cannot drift: every edge of ALLOWED_TRANSITIONS is listed
    (with when it happens), and nothing else is."""
    rows = _documented_edges()
    documented = [(a, b) for a, b, _ in rows]
    allowed = {
        (source.name, target.name)
        for source, targets in ALLOWED_TRANSITIONS.items()
        for target in targets
    }
    assert len(documented) == len(set(documented)), "an edge is listed twice"
    assert set(documented) - allowed == set(), "DESIGN.md lists edges the manager refuses"
    assert allowed - set(documented) == set(), "DESIGN.md misses edges of ALLOWED_TRANSITIONS"
    assert all(when for _, _, when in rows), "every edge says when it happens"


def test_transition_table_has_no_dead_ends() -> None:
    for state in EngineState:
        assert ALLOWED_TRANSITIONS[state], f"{state} has no way out"
    assert EngineState.READY not in ALLOWED_TRANSITIONS[EngineState.IDLE]
    # A ready engine is always drained before it is stopped (RESTARTING: it died already).
    # A ready engine is drained before it sleeps, too.
    assert ALLOWED_TRANSITIONS[EngineState.READY] == {
        EngineState.DRAINING,
        EngineState.FAILED,
        EngineState.RESTARTING,
        EngineState.SLEEPING,
    }
    # An engine is woken only from ASLEEP, and only through WAKING.
    assert {s for s, targets in ALLOWED_TRANSITIONS.items() if EngineState.WAKING in targets} == {
        EngineState.ASLEEP
    }
    assert EngineState.READY not in ALLOWED_TRANSITIONS[EngineState.ASLEEP]
    # A restart never passes IDLE (requests held for it would be refused there) and never
    # skips the start's own checks.
    assert EngineState.IDLE not in ALLOWED_TRANSITIONS[EngineState.RESTARTING]
    assert EngineState.READY not in ALLOWED_TRANSITIONS[EngineState.RESTARTING]


async def test_invalid_transition_raises(manager: VLLMModelManager) -> None:
    engine = manager._engine_for("sim")
    with pytest.raises(InvalidTransition, match="not allowed"):
        engine._enter(EngineState.READY, "skipping STARTING", expect=EngineState.IDLE)
    # Compare-and-set: a transition that expects another state than the engine's is refused,
    # even when the edge itself exists.
    with pytest.raises(InvalidTransition, match="expected ready"):
        engine._enter(EngineState.STARTING, "from the wrong state", expect=EngineState.READY)
    assert engine.state is EngineState.IDLE


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


@pytest.fixture
async def stubborn() -> AsyncIterator[tuple[VLLMModelManager, StopFailsRuntime]]:
    """A manager whose process runtime fails to stop on demand; stops really at the end."""
    runtime = StopFailsRuntime()

    def any_profile(profile_id: str) -> EngineSpec:
        return dataclasses.replace(_simulator_spec(free_port()), profile_id=profile_id)

    async with httpx.AsyncClient() as http:
        mgr = VLLMModelManager(
            http=http,
            runtimes={"process": runtime},
            spec_factory=any_profile,
            poll_interval_s=0.05,
        )
        try:
            yield mgr, runtime
        finally:
            runtime.fail_stop = False
            await mgr.aclose()


async def test_no_start_over_an_engine_whose_stop_failed(
    stubborn: tuple[VLLMModelManager, StopFailsRuntime],
) -> None:
    manager, runtime = stubborn
    assert (await manager.start(_simulator_spec(free_port()))).state is EngineState.READY
    old = manager.handle
    assert old is not None

    runtime.fail_stop = True
    with pytest.raises(EngineNotStopped) as refused:
        await manager.start(_simulator_spec(free_port()))
    # Refused, and says why and what to do; the old engine is still the one held, and runs.
    message = str(refused.value)
    assert "could not be confirmed stopped" in message
    assert "the stop timed out" in message
    assert "Retry the stop" in message
    assert runtime.starts == 1, "a second engine was launched over the first"
    assert manager.handle == old
    assert manager.state is EngineState.FAILED
    assert manager.status().error == message
    assert pid_alive(int(old.id))
    health = await manager.probe()
    assert not health.ok
    assert "could not be confirmed stopped" in health.detail

    # A switch job is refused the same way: the job fails with the reason, nothing launches.
    job = await manager.wait_job(manager.request_switch("sim-2", exclusive=True).id, timeout_s=30)
    assert job.status is JobStatus.FAILED
    assert job.error
    assert "could not be confirmed stopped" in job.error
    assert runtime.starts == 1
    assert manager.handle == old

    # A stop retry that succeeds clears the handle (the engine is gone), and starts work again.
    runtime.fail_stop = False
    stopped = await manager.stop()
    assert stopped.state is EngineState.IDLE
    assert manager.handle is None
    assert not pid_alive(int(old.id))
    again = await manager.start(_simulator_spec(free_port()))
    assert again.state is EngineState.READY, again.error
    assert runtime.starts == 2


async def test_a_switch_retries_the_failed_stop_first_and_then_starts(
    stubborn: tuple[VLLMModelManager, StopFailsRuntime],
) -> None:
    manager, runtime = stubborn
    assert (await manager.start(_simulator_spec(free_port()))).state is EngineState.READY
    old = manager.handle
    assert old is not None
    runtime.fail_stop = True
    assert (await manager.stop()).state is EngineState.FAILED
    assert manager.handle == old
    # The stop works again: the next switch's own stop clears the old engine, then it starts.
    runtime.fail_stop = False
    job = await manager.wait_job(manager.request_switch("sim-2", exclusive=True).id, timeout_s=30)
    assert job.status is JobStatus.SUCCEEDED, job.error
    assert not pid_alive(int(old.id))
    assert manager.status().profile_id == "sim-2"
    assert manager.handle is not None
    assert manager.handle != old
    assert runtime.starts == 2


async def test_a_failed_start_whose_clean_up_stop_fails_keeps_the_handle(
    stubborn: tuple[VLLMModelManager, StopFailsRuntime],
) -> None:
    manager, runtime = stubborn
    runtime.fail_stop = True
    # Launched but never serving in time: the clean-up stop fails, so the process still runs.
    status = await manager.start(
        _simulator_spec(free_port(), "--startup-delay", "30", timeout_s=1.0)
    )
    assert status.state is EngineState.FAILED
    assert status.error
    assert "not serving after" in status.error
    assert "stop failed: the stop timed out" in status.error
    held = manager.handle
    assert held is not None, "the handle of an engine that may still run was dropped"
    assert pid_alive(int(held.id))
    with pytest.raises(EngineNotStopped):
        await manager.start(_simulator_spec(free_port()))
    assert runtime.starts == 1
    runtime.fail_stop = False
    assert (await manager.stop()).state is EngineState.IDLE
    assert not pid_alive(int(held.id))
