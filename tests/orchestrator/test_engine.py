"""One engine's sleep and wake (vLLM's sleep contract, served by real simulator processes): the
states it passes, the drain before a sleep, level 2's reload, and the cold stop that follows a
sleep or a wake that fails."""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator

import httpx
import pytest

from orchestrator.engine import EngineEvent, EngineState, ManagedEngine
from orchestrator.manager import VLLMModelManager
from orchestrator.runtimes import ProcessRuntime
from tests.helpers.polling import eventually
from tests.helpers.ports import free_port
from tests.helpers.processes import pid_alive
from tests.helpers.runtimes import simulator_spec

KEY = "engine-key-for-sleep-tests-0123456789abcdef"
HELLO = {"model": "sim-model", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


@pytest.fixture
async def fleet() -> AsyncIterator[VLLMModelManager]:
    async with httpx.AsyncClient() as http:
        manager = VLLMModelManager(
            http=http,
            runtimes={"process": ProcessRuntime()},
            spec_factory=lambda pid: simulator_spec(free_port(), profile_id=pid, api_key=KEY),
            poll_interval_s=0.05,
            drain_timeout_s=10,
        )
        try:
            yield manager
        finally:
            await manager.aclose()


async def _ready(manager: VLLMModelManager, *flags: str) -> ManagedEngine:
    """A ready simulator engine of profile `sim` started with `flags` (--test-routes added)."""
    spec = simulator_spec(free_port(), "--test-routes", *flags, api_key=KEY)
    status = await manager.start(spec)
    assert status.state is EngineState.READY, status.error
    engine = manager.engine("sim")
    assert engine is not None
    return engine


def _record(manager: VLLMModelManager) -> list[EngineState]:
    """The states the engines pass from now on (events as the fleet publishes them)."""
    seen: list[EngineState] = []
    original = manager._publish

    def publish(event: EngineEvent) -> None:
        seen.append(event.state)
        original(event)

    for engine in manager.engines():
        engine._publish = publish
    return seen


async def _engine_get(engine: ManagedEngine, path: str) -> httpx.Response:
    assert engine.base_url is not None
    async with httpx.AsyncClient() as client:
        return await client.get(engine.base_url + path, headers={"Authorization": f"Bearer {KEY}"})


async def _chat(engine: ManagedEngine) -> httpx.Response:
    assert engine.base_url is not None
    async with httpx.AsyncClient() as client:
        return await client.post(
            engine.base_url + "/v1/chat/completions",
            json=HELLO,
            headers={"Authorization": f"Bearer {KEY}"},
        )


async def test_level_1_sleep_then_wake_passes_the_sleep_states(
    fleet: VLLMModelManager,
) -> None:
    engine = await _ready(fleet)
    seen = _record(fleet)
    assert engine.sleep_capable
    assert await engine.sleep(1)
    assert engine.state is EngineState.ASLEEP
    assert engine.status().asleep
    assert engine.status().sleep_level == 1
    assert (await _engine_get(engine, "/is_sleeping")).json() == {"is_sleeping": True}
    # Parked: no request is admitted, and the process is still there.
    assert not engine.acquire_slot()
    assert engine.handle is not None
    assert pid_alive(int(engine.handle.id))
    assert await engine.wake()
    assert engine.status().state is EngineState.READY
    assert engine.last_wake_s is not None
    assert (await _engine_get(engine, "/is_sleeping")).json() == {"is_sleeping": False}
    assert (await _chat(engine)).status_code == 200
    assert seen == [
        EngineState.SLEEPING,
        EngineState.ASLEEP,
        EngineState.WAKING,
        EngineState.READY,
    ]


async def test_level_2_wake_reloads_the_weights_before_it_serves(
    fleet: VLLMModelManager,
) -> None:
    engine = await _ready(fleet)
    assert await engine.sleep(2)
    assert engine.status().sleep_level == 2
    assert await engine.wake()
    # The simulator refuses to serve until reload_weights ran after a level-2 sleep: a 200 here
    # means the wake woke the weights, reloaded them, then woke the KV cache.
    response = await _chat(engine)
    assert response.status_code == 200, response.text


async def test_sleep_drains_in_flight_requests_first(fleet: VLLMModelManager) -> None:
    engine = await _ready(fleet)
    assert engine.acquire_slot()
    sleeping = asyncio.create_task(engine.sleep(1))
    await eventually(lambda: engine.state is EngineState.SLEEPING, 5)
    await asyncio.sleep(0.3)
    # Still draining: the engine was not told to sleep while a request ran.
    assert (await _engine_get(engine, "/is_sleeping")).json() == {"is_sleeping": False}
    assert not engine.acquire_slot()
    engine.release_slot()
    assert await sleeping
    stats = (await _engine_get(engine, "/simulator/stats")).json()
    assert stats["sleeps_while_running"] == 0, stats


async def test_a_failed_sleep_stops_the_engine_cold(fleet: VLLMModelManager) -> None:
    engine = await _ready(fleet, "--fail-sleep")
    assert engine.handle is not None
    pid = int(engine.handle.id)
    seen = _record(fleet)
    assert not await engine.sleep(1)
    # Its memory had to be freed either way: the process is gone and the engine is IDLE.
    assert engine.state is EngineState.IDLE
    assert engine.handle is None
    await eventually(lambda: not pid_alive(pid), 10)
    assert seen == [EngineState.SLEEPING, EngineState.STOPPING, EngineState.IDLE]


async def test_a_failed_wake_stops_the_engine_for_a_cold_start(fleet: VLLMModelManager) -> None:
    engine = await _ready(fleet, "--fail-wake")
    assert await engine.sleep(1)
    assert engine.handle is not None
    pid = int(engine.handle.id)
    assert not await engine.wake()
    assert engine.state is EngineState.IDLE
    await eventually(lambda: not pid_alive(pid), 10)
    # The fleet's load then starts it cold: it serves again.
    job = await fleet.wait_job(fleet.request_load("sim").id, timeout_s=30)
    assert job.status.value == "succeeded", job.error
    assert engine.serves


async def test_an_engine_that_dies_asleep_is_removed_not_restarted(
    fleet: VLLMModelManager,
) -> None:
    engine = await _ready(fleet)
    assert await engine.sleep(1)
    assert engine.handle is not None
    pid = int(engine.handle.id)
    os.killpg(pid, signal.SIGKILL)
    await eventually(lambda: not pid_alive(pid), 10)

    async def looked() -> bool:
        # The runtime learns of the exit when the event loop reaps the child: look until then.
        await engine.check_alive()
        return engine.state is EngineState.IDLE

    await eventually(looked, 10)
    assert engine.handle is None
    assert engine.restarts == 0
