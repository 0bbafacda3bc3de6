"""The manager restarts an engine that died on its own (real simulator processes killed with
SIGKILL), gives up on a crash loop, and follows an engine's sleep (vLLM's sleep contract)."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest

from orchestrator.manager import EngineEvent, EngineNotStopped, EngineState, VLLMModelManager
from orchestrator.recovery import PUBLIC_REASONS, Failure, RestartPolicy
from orchestrator.runtimes import EngineSpec, ProcessRuntime
from tests.helpers.polling import eventually
from tests.helpers.ports import free_port
from tests.helpers.processes import pid_alive
from tests.helpers.runtimes import StopFailsRuntime, simulator_spec

# Fast enough for tests: a restart 0.05 s after the first crash, 0.1 s after the second, ...
FAST = RestartPolicy(max_restarts=3, window_s=60, backoff_s=0.05, backoff_max_s=1)
ENGINE_KEY = "engine-key-for-restart-tests-0123456789abc"


class Factory:
    """The manager's spec factory: a fresh simulator spec per call (a new port, as the gateway's
    does), with the flags currently in `flags`."""

    def __init__(self) -> None:
        self.flags: tuple[str, ...] = ()
        self.calls = 0

    def __call__(self, profile_id: str) -> EngineSpec:
        self.calls += 1
        spec = simulator_spec(free_port(), *self.flags, api_key=ENGINE_KEY)
        return dataclasses.replace(spec, profile_id=profile_id)


@pytest.fixture
async def make_manager() -> AsyncIterator[Callable[..., tuple[VLLMModelManager, Factory]]]:
    """Build managers (policy and runtime per test) whose engines are stopped at the end."""
    managers: list[VLLMModelManager] = []
    async with httpx.AsyncClient() as http:

        def make(
            policy: RestartPolicy = FAST, runtime: Any = None
        ) -> tuple[VLLMModelManager, Factory]:
            factory = Factory()
            manager = VLLMModelManager(
                http=http,
                runtimes={"process": runtime or ProcessRuntime()},
                spec_factory=factory,
                poll_interval_s=0.05,
                restart_policy=policy,
            )
            manager.start_watchdog(interval_s=0.1)
            managers.append(manager)
            return manager, factory

        try:
            yield make
        finally:
            for manager in managers:
                await manager.aclose()


async def _started(manager: VLLMModelManager, factory: Factory) -> int:
    """Start the engine of profile `sim`; return its pid."""
    status = await manager.start(factory("sim"))
    assert status.state is EngineState.READY, status.error
    assert manager.handle is not None
    return int(manager.handle.id)


def _kill(pid: int) -> None:
    os.killpg(pid, signal.SIGKILL)


async def _collect(manager: VLLMModelManager, into: list[EngineEvent]) -> None:
    async for event in manager.subscribe():
        into.append(event)


async def _state_is(manager: VLLMModelManager, *states: EngineState) -> bool:
    return manager.state in states


async def test_a_killed_engine_is_restarted_and_serves_again(
    make_manager: Callable[..., tuple[VLLMModelManager, Factory]],
) -> None:
    manager, factory = make_manager()
    first = await _started(manager, factory)
    events: list[EngineEvent] = []
    watcher = asyncio.create_task(_collect(manager, events))
    await asyncio.sleep(0)
    _kill(first)

    async def restarted() -> bool:
        handle = manager.handle
        return manager.state is EngineState.READY and handle is not None and handle.id != str(first)

    await eventually(restarted, 20)
    watcher.cancel()
    status = manager.status()
    states = [e.state for e in events]
    # Through RESTARTING straight to STARTING: never IDLE, where held requests are refused.
    assert states == [
        EngineState.RESTARTING,
        EngineState.STARTING,
        EngineState.LOADING,
        EngineState.READY,
    ]
    assert "engine exited while serving" in events[0].message
    assert manager.restart_counts() == {"sim": 1}
    assert status.recent_crashes == 1
    assert status.error is None
    assert status.failure is None
    # The dead engine's log lines are kept for admins (the simulator said it was ready).
    assert any("SIMULATOR ready" in line for line in status.logs)
    assert not pid_alive(first)
    # The new engine (new port, new spec from the factory) answers with its key.
    assert factory.calls == 2
    async with httpx.AsyncClient() as client:
        reply = await client.post(
            f"{status.base_url}/v1/chat/completions",
            json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
            headers={"Authorization": f"Bearer {ENGINE_KEY}"},
        )
    assert reply.status_code == 200, reply.text


async def test_a_restart_that_keeps_failing_ends_in_a_crash_loop(
    make_manager: Callable[..., tuple[VLLMModelManager, Factory]],
) -> None:
    policy = RestartPolicy(max_restarts=2, window_s=60, backoff_s=0.05, backoff_max_s=1)
    manager, factory = make_manager(policy)
    first = await _started(manager, factory)
    events: list[EngineEvent] = []
    watcher = asyncio.create_task(_collect(manager, events))
    await asyncio.sleep(0)
    # From now on the profile's engine fails while loading (like an OOM at every start).
    factory.flags = ("--fail-at-start",)
    _kill(first)
    await eventually(lambda: _state_is(manager, EngineState.FAILED), 30)
    watcher.cancel()
    status = manager.status()

    # The kill, then two restarts that failed: three crashes, one more than two restarts.
    assert manager.restart_counts() == {"sim": 2}
    assert status.failure is Failure.CRASH_LOOP
    assert status.error is not None
    assert status.error.startswith("crash loop: the engine crashed 3 times within 60s")
    assert "exited during startup" in status.error
    assert status.reason == PUBLIC_REASONS[Failure.CRASH_LOOP]
    assert any("CUDA out of memory (simulated)" in line for line in status.logs)
    # The backoff doubled between the restarts.
    restarting = [e.message for e in events if e.state is EngineState.RESTARTING]
    assert len(restarting) == 2
    assert restarting[0].endswith("in 0.05s")
    assert restarting[1].endswith("in 0.1s")
    # Not restarted again: the state stays FAILED, and no third restart begins.
    await asyncio.sleep(0.5)
    assert manager.state is EngineState.FAILED
    assert manager.restart_counts() == {"sim": 2}
    health = await manager.probe()
    assert not health.ok
    assert health.failure is Failure.CRASH_LOOP
    assert health.detail == PUBLIC_REASONS[Failure.CRASH_LOOP]
    # An operator's switch starts it again, with a fresh crash history.
    factory.flags = ()
    job = await manager.wait_job(manager.request_switch("sim").id, timeout_s=30)
    assert job.status.value == "succeeded", job.error
    assert manager.status().recent_crashes == 0


async def test_with_restarts_off_a_dead_engine_stays_failed(
    make_manager: Callable[..., tuple[VLLMModelManager, Factory]],
) -> None:
    manager, factory = make_manager(RestartPolicy(max_restarts=0))
    pid = await _started(manager, factory)
    _kill(pid)
    await eventually(lambda: _state_is(manager, EngineState.FAILED), 10)
    await asyncio.sleep(0.3)
    status = manager.status()
    assert status.state is EngineState.FAILED
    assert status.failure is Failure.CRASHED
    assert status.error is not None
    assert status.error.startswith("engine exited while serving: ")
    assert status.reason == "the engine stopped unexpectedly"
    assert manager.restart_counts() == {}


async def test_stop_during_the_backoff_drops_the_restart(
    make_manager: Callable[..., tuple[VLLMModelManager, Factory]],
) -> None:
    manager, factory = make_manager(RestartPolicy(max_restarts=3, window_s=60, backoff_s=0.6))
    pid = await _started(manager, factory)
    _kill(pid)
    await eventually(lambda: _state_is(manager, EngineState.RESTARTING), 10)
    restart_at = manager.status().restart_at
    assert restart_at is not None
    stopped = await manager.stop()
    assert stopped.state is EngineState.IDLE
    # Well past the backoff: nothing was restarted behind the operator's back.
    await asyncio.sleep(1.0)
    assert manager.state is EngineState.IDLE
    assert manager.handle is None
    assert manager.restart_counts() == {}
    assert factory.calls == 1


async def test_a_switch_during_the_backoff_replaces_the_restart(
    make_manager: Callable[..., tuple[VLLMModelManager, Factory]],
) -> None:
    manager, factory = make_manager(RestartPolicy(max_restarts=3, window_s=60, backoff_s=0.6))
    pid = await _started(manager, factory)
    _kill(pid)
    await eventually(lambda: _state_is(manager, EngineState.RESTARTING), 10)
    job = await manager.wait_job(manager.request_switch("sim-2", exclusive=True).id, timeout_s=30)
    assert job.status.value == "succeeded", job.error
    await asyncio.sleep(1.0)
    status = manager.status()
    assert (status.state, status.profile_id) == (EngineState.READY, "sim-2")
    assert manager.restart_counts() == {}
    assert status.recent_crashes == 0


async def test_a_dead_engine_that_cannot_be_cleaned_up_is_not_restarted(
    make_manager: Callable[..., tuple[VLLMModelManager, Factory]],
) -> None:
    """The rule of "no orphaned engine": a stop that fails keeps the handle, and nothing is
    started over it, restart or not."""
    runtime = StopFailsRuntime()
    manager, factory = make_manager(FAST, runtime)
    pid = await _started(manager, factory)
    held = manager.handle
    runtime.fail_stop = True
    _kill(pid)
    await eventually(lambda: _state_is(manager, EngineState.FAILED), 10)
    status = manager.status()
    assert status.failure is Failure.NOT_STOPPED
    assert status.error is not None
    assert "could not be cleaned up (stop failed: the stop timed out)" in status.error
    assert manager.handle == held
    assert runtime.starts == 1
    with pytest.raises(EngineNotStopped):
        await manager.start(factory("sim"))
    assert runtime.starts == 1
    runtime.fail_stop = False
    assert (await manager.stop()).state is EngineState.IDLE


async def test_an_engine_put_to_sleep_serves_nothing_until_it_wakes(
    make_manager: Callable[..., tuple[VLLMModelManager, Factory]],
) -> None:
    manager, factory = make_manager()
    await _started(manager, factory)
    base_url = manager.base_url
    assert base_url is not None
    key = {"Authorization": f"Bearer {ENGINE_KEY}"}
    assert (await manager.probe()).ok
    async with httpx.AsyncClient(base_url=base_url, headers=key) as engine:
        assert (await engine.post("/sleep", params={"level": "1"})).status_code == 200
        # The readiness probe asks the engine itself, so it says so at once.
        health = await manager.probe()
        assert not health.ok
        assert health.failure is Failure.ASLEEP
        assert health.detail == "the engine is asleep"
        status = manager.status()
        assert (status.state, status.asleep, status.failure) == (
            EngineState.READY,
            True,
            Failure.ASLEEP,
        )
        assert not manager.acquire_slot()
        assert (await engine.post("/wake_up")).status_code == 200
        # The watchdog follows it too, without a probe.

        async def awake() -> bool:
            return not manager.status().asleep

        await eventually(awake, 5)
        assert (await manager.probe()).ok
        assert manager.acquire_slot()
        manager.release_slot()
        # ...and notices the next sleep on its own.
        assert (await engine.post("/sleep", params={"level": "2"})).status_code == 200

        async def asleep() -> bool:
            return manager.status().asleep

        await eventually(asleep, 5)
