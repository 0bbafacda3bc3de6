"""The fleet's jobs on real simulator processes (no GPU placement: the engines claim nothing):
operations on different engines run at the same time, two on one engine never do, and the
default engine is what "current" names."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator

import httpx
import pytest

from orchestrator.manager import (
    EngineBusy,
    EngineEvent,
    EngineState,
    JobKind,
    VLLMModelManager,
)
from orchestrator.runtimes import EngineSpec, ProcessRuntime
from tests.helpers.ports import free_port
from tests.helpers.runtimes import simulator_spec

KEY = "engine-key-for-fleet-tests-0123456789abcdef"


def _spec(profile_id: str) -> EngineSpec:
    """Each profile a simulator that takes 1 s to load (so that loads overlap visibly)."""
    spec = simulator_spec(free_port(), "--startup-delay", "1", api_key=KEY)
    return dataclasses.replace(spec, profile_id=profile_id, served_model_name="sim-model")


@pytest.fixture
async def fleet() -> AsyncIterator[VLLMModelManager]:
    async with httpx.AsyncClient() as http:
        manager = VLLMModelManager(
            http=http,
            runtimes={"process": ProcessRuntime()},
            spec_factory=_spec,
            poll_interval_s=0.05,
            max_engines=3,
        )
        try:
            yield manager
        finally:
            await manager.aclose()


def _timeline(manager: VLLMModelManager) -> list[EngineEvent]:
    events: list[EngineEvent] = []
    original = manager._publish

    def publish(event: EngineEvent) -> None:
        events.append(event)
        original(event)

    manager._publish = publish  # type: ignore[method-assign]
    return events


async def test_loads_of_different_engines_overlap(fleet: VLLMModelManager) -> None:
    events = _timeline(fleet)
    jobs = [fleet.request_load(pid) for pid in ("a", "b")]
    for job in jobs:
        done = await fleet.wait_job(job.id, timeout_s=30)
        assert done.status.value == "succeeded", done.error
    # Walk the events: at some moment both engines were loading at once.
    loading: set[str] = set()
    overlapped = False
    for event in events:
        if event.state in (EngineState.STARTING, EngineState.LOADING):
            loading.add(event.profile_id)
        elif event.profile_id in loading:
            loading.discard(event.profile_id)
        overlapped = overlapped or loading == {"a", "b"}
    assert overlapped, [(e.profile_id, e.state.value) for e in events]
    assert {e.profile_id for e in fleet.resident()} == {"a", "b"}
    # The first engine loaded into an empty fleet is the default ("current").
    assert fleet.default_profile_id in {"a", "b"}


async def test_two_operations_on_one_engine_never_run_at_once(fleet: VLLMModelManager) -> None:
    load = fleet.request_load("a")
    # A second load of the same engine joins the first; any other job on it is refused.
    assert fleet.request_load("a") is load
    with pytest.raises(EngineBusy) as busy:
        fleet.request_unload("a")
    assert busy.value.job_id == load.id
    with pytest.raises(EngineBusy):
        fleet.request_sleep("a", 1)
    done = await fleet.wait_job(load.id, timeout_s=30)
    assert done.status.value == "succeeded", done.error
    unload = await fleet.wait_job(fleet.request_unload("a").id, timeout_s=30)
    assert unload.kind is JobKind.UNLOAD
    assert unload.status.value == "succeeded", unload.error
    engine = fleet.engine("a")
    assert engine is not None
    assert engine.state is EngineState.IDLE


async def test_max_engines_evicts_the_least_recently_used(fleet: VLLMModelManager) -> None:
    for pid in ("a", "b", "c"):
        job = await fleet.wait_job(fleet.request_load(pid).id, timeout_s=30)
        assert job.status.value == "succeeded", job.error
    b = fleet.engine("b")
    assert b is not None
    assert b.acquire_slot()  # b and c were used after a
    b.release_slot()
    job = await fleet.wait_job(fleet.request_load("d").id, timeout_s=30)
    assert job.status.value == "succeeded", job.error
    states = {e.profile_id: e.state for e in fleet.engines()}
    assert states["a"] is EngineState.IDLE
    assert [states[p] for p in ("b", "c", "d")] == [EngineState.READY] * 3
    assert fleet.evictions == {"max_engines_stop": 1}
