"""The fleet's series (gateway_fleet_*) follow a real fleet: simulator engines placed on the
recorded dual RTX 3090 as 7B models, loaded, evicted to sleep, woken and unloaded, with
/metrics scraped after each step.

The registry lives as long as the interpreter (other tests in this process counted things
already): counters and histograms are compared with the scrape before each step.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from prometheus_client import REGISTRY

from gateway.engine import ModelControl
from gateway.metrics.fleet import EVICTION_REASONS, FleetSeries
from gateway.settings import Settings
from orchestrator.gpus import GpuInventory
from orchestrator.manager import EngineState, JobStatus, SwitchJob, VLLMModelManager
from orchestrator.placement import Placement
from orchestrator.profiles import Profile
from orchestrator.runtimes.base import EngineSpec
from tests.helpers.metrics import Scrape, scrape
from tests.helpers.paths import DUAL_3090_SNAPSHOT
from tests.helpers.profiles import standing_in_for_7b
from tests.helpers.proxy import gateway, gateway_settings


def _simulator(model: str) -> dict[str, Any]:
    """A simulator engine (it speaks vLLM's sleep contract) placed as a 7B model that sleeps
    at level 2 when evicted."""
    profile = {
        "display_name": f"Simulator {model}",
        "engine": "simulator",
        "runtime": "process",
        "served_model_name": model,
        "startup_timeout_s": 30,
    }
    return standing_in_for_7b(profile, sleep_level=2)


def _settings(**overrides: Any) -> Settings:
    return gateway_settings(
        {"fleet-a": _simulator("fleet-a"), "fleet-b": _simulator("fleet-b")},
        "fleet-a",
        GPU_SNAPSHOT=str(DUAL_3090_SNAPSHOT),
        METRICS_GPU_INTERVAL_S=30,
        **overrides,
    )


async def _finished(manager: VLLMModelManager, job: SwitchJob) -> None:
    done = await manager.wait_job(job.id, timeout_s=60)
    assert done.status is JobStatus.SUCCEEDED, (done.error, done.logs)


def _claims(scraped: Scrape, name: str) -> dict[tuple[str, str], float]:
    """(gpu, engine) -> value of a per-claim gauge."""
    return {
        (labels["gpu"], labels["engine"]): value
        for n, labels, value in scraped.samples
        if n == name
    }


async def test_fleet_series_follow_loads_evictions_wakes_and_unloads() -> None:
    # One awake engine at a time: loading the second puts the first to sleep.
    async with gateway(_settings(FLEET_MAX_ENGINES=1)) as gw:
        manager: VLLMModelManager = gw.manager
        models: ModelControl = gw.app.state.resources.models
        started = await scrape(gw.http)
        # Every state and every eviction reason has a series from the start.
        assert started.label_values("gateway_fleet_engines", "state") == {
            state.value for state in EngineState
        }
        assert set(EVICTION_REASONS) <= started.label_values(
            "gateway_fleet_evictions_total", "reason"
        )
        assert {"fleet-a", "fleet-b"} <= started.label_values(
            "gateway_fleet_swap_wait_seconds_count", "model"
        )
        assert started.value("gateway_fleet_engines", state="ready") == 1
        assert started.value("gateway_fleet_engines", state="asleep") == 0
        assert started.value("gateway_fleet_operation_seconds_count", kind="cold") >= 1
        claim_a = manager.claim("fleet-a")
        assert claim_a is not None
        assert claim_a.gpu_ids
        awake_a = {(str(gpu), "fleet-a"): float(claim_a.bytes_per_gpu) for gpu in claim_a.gpu_ids}
        assert _claims(started, "gateway_fleet_vram_claim_bytes") == awake_a
        assert _claims(started, "gateway_fleet_vram_budget_bytes") == awake_a

        await _finished(manager, models.load("fleet-b"))
        loaded = await scrape(gw.http)

        def grew(name: str, **labels: str) -> float:
            return loaded.value(name, **labels) - started.value(name, **labels)

        assert grew("gateway_fleet_operation_seconds_count", kind="cold") == 1
        assert grew("gateway_fleet_operation_seconds_count", kind="sleep") == 1
        assert grew("gateway_fleet_operation_seconds_count", kind="wake") == 0
        assert grew("gateway_fleet_evictions_total", reason="max_engines_sleep") == 1
        assert grew("gateway_fleet_evictions_total") == 1
        assert loaded.value("gateway_fleet_engines", state="ready") == 1
        assert loaded.value("gateway_fleet_engines", state="asleep") == 1
        assert loaded.value("gateway_engine_state", profile="fleet-a", state="asleep") == 1
        assert loaded.value("gateway_engine_state", profile="fleet-b", state="ready") == 1
        # The sleeper holds its residual, its budget is what a wake needs back.
        asleep_a = manager.claim("fleet-a")
        claim_b = manager.claim("fleet-b")
        assert asleep_a is not None
        assert asleep_a.asleep
        assert claim_b is not None
        assert asleep_a.held_per_gpu < asleep_a.bytes_per_gpu
        held = _claims(loaded, "gateway_fleet_vram_claim_bytes")
        budget = _claims(loaded, "gateway_fleet_vram_budget_bytes")
        for gpu in asleep_a.gpu_ids:
            assert held[(str(gpu), "fleet-a")] == asleep_a.held_per_gpu
            assert budget[(str(gpu), "fleet-a")] == asleep_a.bytes_per_gpu
        for gpu in claim_b.gpu_ids:
            assert held[(str(gpu), "fleet-b")] == budget[(str(gpu), "fleet-b")] > 0

        await _finished(manager, manager.request_wake("fleet-a"))
        await _finished(manager, manager.request_unload("fleet-b"))
        after = await scrape(gw.http)
        assert (
            after.value("gateway_fleet_operation_seconds_count", kind="wake")
            - loaded.value("gateway_fleet_operation_seconds_count", kind="wake")
            == 1
        )
        assert after.value("gateway_fleet_engines", state="ready") == 1
        assert after.value("gateway_fleet_engines", state="idle") == 1
        assert after.value("gateway_fleet_engines", state="asleep") == 0
        # The unloaded engine left the ledger, and its series with it; the woken one holds its
        # budget again.
        assert _claims(after, "gateway_fleet_vram_claim_bytes") == awake_a
        assert after.series("gateway_fleet_vram_budget_bytes") == [
            {"gpu": gpu, "engine": "fleet-a"} for gpu, _ in awake_a
        ]


class _NvmlReading:
    """The gateway's placer, with its recorded GPU reading presented as NVML's: the ledger
    check runs only against a live reading, and this machine has no GPU. The recorded used
    memory never moves, so every engine the fleet places is memory NVML does not see."""

    def __init__(self, control: ModelControl) -> None:
        self._control = control

    def profile(self, profile_id: str) -> Profile:
        return self._control.profile(profile_id)

    def inventory(self, *, fresh: bool = False) -> GpuInventory:
        return dataclasses.replace(self._control.inventory(fresh=fresh), source="nvml")

    def placed_spec(self, profile_id: str, placement: Placement | None) -> EngineSpec:
        return self._control.placed_spec(profile_id, placement)

    def host_free_bytes(self) -> int:
        return self._control.host_free_bytes()


@pytest.fixture
async def nvml_fleet() -> AsyncIterator[VLLMModelManager]:
    """A fleet whose placer reads "NVML", with the gateway's profiles and runtimes."""
    async with httpx.AsyncClient() as http:
        control = ModelControl(_settings(), http)
        manager = VLLMModelManager(
            http=http,
            runtimes=control.runtimes,
            spec_factory=control.spec_for,
            poll_interval_s=0.05,
            placer=_NvmlReading(control),
        )
        try:
            yield manager
        finally:
            await manager.aclose()


async def test_ledger_mismatches_and_operation_durations_are_counted(
    nvml_fleet: VLLMModelManager,
) -> None:
    fleet = FleetSeries(nvml_fleet)
    stop = nvml_fleet.observe_operations(fleet.observe)
    colds_before = _value("gateway_fleet_operation_seconds_count", kind="cold")
    mismatches_before = _value("gateway_fleet_ledger_mismatches_total")
    try:
        await _finished(nvml_fleet, nvml_fleet.request_load("fleet-a"))
        fleet.sync()
        # The 7B's budget is on one GPU; NVML (the unchanged reading) shows none of it there.
        assert nvml_fleet.ledger_mismatches == 1
        assert _value("gateway_fleet_ledger_mismatches_total") - mismatches_before == 1
        assert _value("gateway_fleet_operation_seconds_count", kind="cold") - colds_before == 1
        # Only growth is added: a second read of the same totals adds nothing.
        fleet.sync()
        assert _value("gateway_fleet_ledger_mismatches_total") - mismatches_before == 1
    finally:
        stop()
        fleet.clear()
    # A stopped observer is told nothing more.
    await _finished(nvml_fleet, nvml_fleet.request_unload("fleet-a"))
    await _finished(nvml_fleet, nvml_fleet.request_load("fleet-a"))
    assert _value("gateway_fleet_operation_seconds_count", kind="cold") - colds_before == 1


def _value(name: str, **labels: str) -> float:
    """A sample of this process's registry (0 before it exists)."""
    return REGISTRY.get_sample_value(name, labels) or 0.0
