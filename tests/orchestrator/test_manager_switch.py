"""Switch jobs through the manager with real engine processes: drain, rollback, one at a time."""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
import pytest

from orchestrator.manager import EngineBusy, EngineState, JobStatus, VLLMModelManager
from orchestrator.runtimes import EngineSpec, ExternalRuntime, ProcessRuntime
from tests.helpers.polling import eventually
from tests.helpers.ports import free_port

# Profile id -> extra simulator flags; "broken" fails while loading like an engine that OOMs.
PROFILES = {
    "alpha": (),
    "beta": (),
    "slow": ("--startup-delay", "1.5"),
    "broken": ("--startup-delay", "0.3", "--fail-at-start"),
    # Healthy, but serving another name than the profile's (a wrong --served-model-name).
    "misnamed": ("--served-model-name", "someone-else"),
}
# Startup timeouts shorter than the default 30 s, for profiles that are meant to time out.
STARTUP_TIMEOUT_S = {"misnamed": 6.0}


# Profile ids whose factory call fails the way the gateway's ModelControl.spec_for can:
# ProfileNotFound is a LookupError, ProfileDoesNotFit a plain Exception.
FACTORY_ERRORS: dict[str, Exception] = {
    "vanished": LookupError("no profile 'vanished'"),
    "too-big": Exception("profile 'too-big' does not fit: needs 48 GiB, 24 GiB free"),
}
# A spec the process runtime cannot even spawn: a NUL byte in argv raises ValueError, not OSError.
NUL_PROFILE = "nul-byte"


def _spec(profile_id: str) -> EngineSpec:
    if profile_id in FACTORY_ERRORS:
        raise FACTORY_ERRORS[profile_id]
    if profile_id == NUL_PROFILE:
        return EngineSpec(
            profile_id=profile_id,
            served_model_name="nul-model",
            runtime="process",
            command=(sys.executable, "-c", "pass\0"),
            port=free_port(),
            startup_timeout_s=5,
        )
    if profile_id not in PROFILES:
        raise KeyError(profile_id)
    port = free_port()
    command = (
        sys.executable,
        "-m",
        "simulator",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--model",
        f"{profile_id}-model",
        *PROFILES[profile_id],
    )
    return EngineSpec(
        profile_id=profile_id,
        served_model_name=f"{profile_id}-model",
        runtime="process",
        command=command,
        port=port,
        startup_timeout_s=STARTUP_TIMEOUT_S.get(profile_id, 30),
    )


@asynccontextmanager
async def _running_manager(drain_timeout_s: float) -> AsyncIterator[VLLMModelManager]:
    """A manager of simulator processes, closed (engine stopped) afterwards."""
    async with httpx.AsyncClient() as http:
        mgr = VLLMModelManager(
            http=http,
            runtimes={"process": ProcessRuntime(), "external": ExternalRuntime()},
            spec_factory=_spec,
            drain_timeout_s=drain_timeout_s,
            poll_interval_s=0.05,
        )
        try:
            yield mgr
        finally:
            await mgr.aclose()


@pytest.fixture
async def manager() -> AsyncIterator[VLLMModelManager]:
    async with _running_manager(drain_timeout_s=5.0) as mgr:
        yield mgr


async def _chat(manager: VLLMModelManager) -> str:
    status = manager.status()
    async with httpx.AsyncClient(base_url=str(status.base_url)) as client:
        response = await client.post(
            "/v1/chat/completions",
            json={
                "model": status.served_model_name,
                "messages": [{"role": "user", "content": "hi"}],
                "max_tokens": 3,
            },
        )
    response.raise_for_status()
    return str(response.json()["model"])


async def test_switch_a_to_b_replaces_the_engine(manager: VLLMModelManager) -> None:
    first = await manager.wait_job(manager.request_switch("alpha", exclusive=True).id, timeout_s=30)
    assert first.status is JobStatus.SUCCEEDED
    assert await _chat(manager) == "alpha-model"
    alpha_url = manager.base_url
    job = manager.request_switch("beta", exclusive=True)
    assert job.previous_profile_id == "alpha"
    done = await manager.wait_job(job.id, timeout_s=30)
    assert done.status is JobStatus.SUCCEEDED, done.error
    assert manager.status().profile_id == "beta"
    assert manager.status().served_names == ("beta-model",)
    assert await _chat(manager) == "beta-model"
    with pytest.raises(httpx.ConnectError):
        async with httpx.AsyncClient() as client:
            await client.get(f"{alpha_url}/health")
    states = [e.state for e in done.events]
    assert states[:3] == [EngineState.DRAINING, EngineState.STOPPING, EngineState.IDLE]
    assert EngineState.LOADING in states
    assert done.events[-1].progress == 1.0


async def test_failed_switch_rolls_back_to_the_previous_profile(
    manager: VLLMModelManager,
) -> None:
    await manager.wait_job(manager.request_switch("alpha", exclusive=True).id, timeout_s=30)
    job = await manager.wait_job(manager.request_switch("broken", exclusive=True).id, timeout_s=30)
    assert job.status is JobStatus.ROLLED_BACK
    assert job.error
    assert "exited during startup" in job.error
    assert any("out of memory" in line.lower() for line in job.logs), job.logs
    # Recorded state equals what is running: alpha again, and it answers.
    assert manager.state is EngineState.READY
    assert manager.status().profile_id == "alpha"
    assert await _chat(manager) == "alpha-model"


async def test_failed_first_start_ends_failed_without_rollback(
    manager: VLLMModelManager,
) -> None:
    job = await manager.wait_job(manager.request_switch("broken", exclusive=True).id, timeout_s=30)
    assert job.status is JobStatus.FAILED
    assert manager.state is EngineState.FAILED
    recovered = await manager.wait_job(
        manager.request_switch("alpha", exclusive=True).id, timeout_s=30
    )
    assert recovered.status is JobStatus.SUCCEEDED


async def test_ten_concurrent_switches_run_exactly_one(manager: VLLMModelManager) -> None:
    accepted, refused = [], []
    for _ in range(10):
        try:
            accepted.append(manager.request_switch("slow", exclusive=True))
        except EngineBusy as exc:
            refused.append(exc)
    assert len(accepted) == 1
    assert len(refused) == 9
    assert all(exc.job_id == accepted[0].id for exc in refused)
    done = await manager.wait_job(accepted[0].id, timeout_s=30)
    assert done.status is JobStatus.SUCCEEDED
    # Once it is done, the next switch is accepted.
    again = manager.request_switch("alpha", exclusive=True)
    assert (await manager.wait_job(again.id, timeout_s=30)).status is JobStatus.SUCCEEDED


async def test_switch_drains_in_flight_requests_first(manager: VLLMModelManager) -> None:
    await manager.wait_job(manager.request_switch("alpha", exclusive=True).id, timeout_s=30)
    released = asyncio.Event()
    order: list[str] = []

    async def in_flight() -> None:
        async with manager.serving():
            await released.wait()
            order.append("request finished")

    holder = asyncio.create_task(in_flight())
    await asyncio.sleep(0.05)
    job = manager.request_switch("beta", exclusive=True)
    # The switch drains and holds there while the request runs, however long the job took to
    # get going.
    await eventually(lambda: manager.state is EngineState.DRAINING, 10)
    await asyncio.sleep(0.3)
    assert manager.state is EngineState.DRAINING
    assert manager.status().in_flight == 1
    order.append("released")
    released.set()
    await holder
    done = await manager.wait_job(job.id, timeout_s=30)
    assert done.status is JobStatus.SUCCEEDED
    assert order == ["released", "request finished"]


async def test_serving_is_refused_while_not_ready(manager: VLLMModelManager) -> None:
    from orchestrator.manager import EngineUnavailable

    with pytest.raises(EngineUnavailable):
        async with manager.serving():
            pytest.fail("entered serving() with no engine")


async def test_unknown_profile_job_fails_with_reason(manager: VLLMModelManager) -> None:
    job = await manager.wait_job(manager.request_switch("nope", exclusive=True).id, timeout_s=5)
    assert job.status is JobStatus.FAILED
    assert job.error
    assert "cannot build engine" in job.error


@pytest.mark.parametrize("profile_id", sorted(FACTORY_ERRORS))
async def test_any_factory_error_fails_the_job_and_frees_switching(
    manager: VLLMModelManager, profile_id: str
) -> None:
    await manager.wait_job(manager.request_switch("alpha", exclusive=True).id, timeout_s=30)
    job = await manager.wait_job(manager.request_switch(profile_id, exclusive=True).id, timeout_s=5)
    assert job.status is JobStatus.FAILED
    assert job.error == f"cannot build engine: {FACTORY_ERRORS[profile_id]}"
    assert manager.current_job is None
    # Nothing was stopped: the engine that ran keeps serving.
    assert manager.state is EngineState.READY
    assert await _chat(manager) == "alpha-model"
    # The one-switch lock is free again: the next switch is accepted and runs.
    again = await manager.wait_job(manager.request_switch("beta", exclusive=True).id, timeout_s=30)
    assert again.status is JobStatus.SUCCEEDED, again.error
    assert await _chat(manager) == "beta-model"


async def test_an_unexpected_start_error_rolls_back_and_frees_switching(
    manager: VLLMModelManager,
) -> None:
    await manager.wait_job(manager.request_switch("alpha", exclusive=True).id, timeout_s=30)
    job = await manager.wait_job(
        manager.request_switch(NUL_PROFILE, exclusive=True).id, timeout_s=30
    )
    assert job.status is JobStatus.ROLLED_BACK
    assert job.error
    assert "ValueError" in job.error
    assert "null byte" in job.error
    assert manager.state is EngineState.READY
    assert manager.status().profile_id == "alpha"
    assert await _chat(manager) == "alpha-model"
    again = await manager.wait_job(manager.request_switch("beta", exclusive=True).id, timeout_s=30)
    assert again.status is JobStatus.SUCCEEDED, again.error


async def test_an_unexpected_first_start_error_fails_and_frees_switching(
    manager: VLLMModelManager,
) -> None:
    job = await manager.wait_job(
        manager.request_switch(NUL_PROFILE, exclusive=True).id, timeout_s=30
    )
    assert job.status is JobStatus.FAILED
    assert job.error
    assert "null byte" in job.error
    assert manager.state is EngineState.FAILED
    again = await manager.wait_job(manager.request_switch("alpha", exclusive=True).id, timeout_s=30)
    assert again.status is JobStatus.SUCCEEDED, again.error


async def test_drain_wait_is_bounded_by_drain_timeout() -> None:
    """A slot that is never given back delays the switch by drain_timeout_s, not forever."""
    drain_timeout_s = 0.6
    async with _running_manager(drain_timeout_s=drain_timeout_s) as manager:
        await manager.wait_job(manager.request_switch("alpha", exclusive=True).id, timeout_s=30)
        # A request that hangs: it takes a slot and does not give it back during the switch.
        assert manager.acquire_slot()
        try:
            started = time.monotonic()
            job = manager.request_switch("beta", exclusive=True)
            done = await manager.wait_job(job.id, timeout_s=30)
            elapsed = time.monotonic() - started
        finally:
            manager.release_slot()
        assert done.status is JobStatus.SUCCEEDED, done.error
        assert manager.status().profile_id == "beta"
        assert await _chat(manager) == "beta-model"
        # The stop waited the whole drain timeout (the slot was held), and then went ahead.
        assert elapsed >= drain_timeout_s
        draining, stopping = done.events[0], done.events[1]
        assert (draining.state, stopping.state) == (EngineState.DRAINING, EngineState.STOPPING)
        assert draining.message == "draining 1 in-flight request(s)"
        assert stopping.message == (
            f"drain timed out after {drain_timeout_s:g}s with 1 request(s) in flight; "
            "stopping engine"
        )
        waited = stopping.at - draining.at
        assert drain_timeout_s - 0.05 <= waited < drain_timeout_s + 2.0, waited


async def test_drain_that_finishes_in_time_does_not_report_a_timeout(
    manager: VLLMModelManager,
) -> None:
    """Without in-flight requests the stop follows the drain at once, with the plain message."""
    await manager.wait_job(manager.request_switch("alpha", exclusive=True).id, timeout_s=30)
    done = await manager.wait_job(manager.request_switch("beta", exclusive=True).id, timeout_s=30)
    assert done.status is JobStatus.SUCCEEDED, done.error
    draining, stopping = done.events[0], done.events[1]
    assert draining.message == "draining 0 in-flight request(s)"
    assert stopping.message == "stopping engine"
    assert stopping.at - draining.at < 1.0


async def test_an_engine_serving_another_name_never_becomes_ready(
    manager: VLLMModelManager,
) -> None:
    """/health 200 is not enough: /v1/models must list the profile's name, else roll back."""
    await manager.wait_job(manager.request_switch("alpha", exclusive=True).id, timeout_s=30)
    started = time.monotonic()
    job = manager.request_switch("misnamed", exclusive=True)
    seen_healthy = False
    misnamed_url: str | None = None
    async with httpx.AsyncClient() as client:
        while not job.done:
            status = manager.status()
            # While it loads, the engine really is up: healthy, and serving the other name.
            if status.profile_id == "misnamed" and status.base_url and not seen_healthy:
                misnamed_url = status.base_url
                try:
                    health = await client.get(f"{misnamed_url}/health")
                    models = (await client.get(f"{misnamed_url}/v1/models")).json()
                except httpx.TransportError:
                    pass  # still binding its port
                else:
                    assert health.status_code == 200
                    assert [m["id"] for m in models["data"]] == ["someone-else"]
                    seen_healthy = True
            assert not (status.profile_id == "misnamed" and status.state is EngineState.READY)
            await asyncio.sleep(0.05)
    elapsed = time.monotonic() - started
    assert seen_healthy, "the misnamed engine never answered /health"
    assert job.status is JobStatus.ROLLED_BACK, job.error
    assert job.error == (
        f"engine not serving after {STARTUP_TIMEOUT_S['misnamed']:g}s: "
        "/v1/models lists someone-else, not misnamed-model"
    )
    # It failed at the profile's startup timeout (not the 30 s default, not at once).
    assert STARTUP_TIMEOUT_S["misnamed"] <= elapsed < STARTUP_TIMEOUT_S["misnamed"] + 20
    misnamed_events = [e for e in job.events if e.profile_id == "misnamed"]
    assert EngineState.LOADING in [e.state for e in misnamed_events]
    assert EngineState.READY not in [e.state for e in misnamed_events]
    assert EngineState.FAILED in [e.state for e in misnamed_events]
    # Rolled back: the previous engine runs and serves again; the misnamed one is gone.
    assert manager.state is EngineState.READY
    assert manager.status().profile_id == "alpha"
    assert manager.status().served_names == ("alpha-model",)
    assert await _chat(manager) == "alpha-model"
    assert misnamed_url is not None
    with pytest.raises(httpx.ConnectError):
        async with httpx.AsyncClient() as client:
            await client.get(f"{misnamed_url}/health")


async def test_wait_job_times_out_naming_the_job_then_returns_its_outcome(
    manager: VLLMModelManager,
) -> None:
    job = manager.request_switch("slow", exclusive=True)
    with pytest.raises(TimeoutError, match=f"switch job {job.id} still (pending|running)"):
        await manager.wait_job(job.id, timeout_s=0.2)
    # The timed-out wait left the job alone: it goes on and a later wait gets its outcome.
    done = await manager.wait_job(job.id, timeout_s=30)
    assert done is job
    assert done.status is JobStatus.SUCCEEDED
    assert manager.status().profile_id == "slow"
    # Waiting on a finished job returns it at once, even with no time at all to wait.
    assert await manager.wait_job(job.id, timeout_s=0) is job
