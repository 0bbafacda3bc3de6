"""Series kept up to date off the request path: GPU readings on an interval, and the engines'
state, switch jobs and restarts from the manager's events; the fleet's engines and claims are
also read at each scrape (the orchestrator knows nothing of metrics)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

from prometheus_client import Gauge

from gateway.logging import get_logger
from gateway.metrics.exposition import refresh_before_scrape
from gateway.metrics.fleet import FleetSeries
from gateway.metrics.series import (
    ENGINE_RESTARTS,
    ENGINE_STATE,
    GPU_COUNT,
    GPU_INFO,
    GPU_MEMORY_TOTAL,
    GPU_MEMORY_USED,
    GPU_POWER,
    GPU_POWER_LIMIT,
    GPU_SAMPLED_AT,
    GPU_TEMPERATURE,
    GPU_UTILIZATION,
    SWITCH_DURATION,
    SWITCHES,
)
from orchestrator.manager import EngineState, JobStatus, VLLMModelManager

if TYPE_CHECKING:
    from orchestrator.gpus import GpuInventory

log = get_logger(__name__)


class EngineView(Protocol):
    """What the samplers read of the engine control (`gateway.engine.ModelControl`): metrics
    sit below it, so they name only these calls."""

    @property
    def manager(self) -> VLLMModelManager:
        """The engine manager (status, jobs, events)."""
        ...

    def profile_ids(self) -> list[str]:
        """Every profile id."""
        ...

    def inventory(self, *, fresh: bool = False) -> GpuInventory:
        """The GPUs."""
        ...


# The outcomes a finished switch job can have.
_SWITCH_OUTCOMES = (JobStatus.SUCCEEDED.value, JobStatus.ROLLED_BACK.value, JobStatus.FAILED.value)

_GPU_GAUGES = (
    GPU_MEMORY_USED,
    GPU_MEMORY_TOTAL,
    GPU_UTILIZATION,
    GPU_TEMPERATURE,
    GPU_POWER,
    GPU_POWER_LIMIT,
)


class GpuSeries:
    """Writes one GPU reading into the gpu gauges; GPUs that disappeared lose their series."""

    def __init__(self) -> None:
        self._seen: dict[str, str] = {}  # gpu label -> name

    def record(self, inventory: GpuInventory, at: float) -> None:
        """Set every GPU gauge from `inventory`, taken at Unix time `at`."""
        current: dict[str, str] = {}
        for gpu in inventory.gpus:
            label = str(gpu.index)
            current[label] = gpu.name
            GPU_INFO.labels(gpu=label, name=gpu.name).set(1)
            GPU_MEMORY_USED.labels(gpu=label).set(gpu.memory_used_bytes)
            GPU_MEMORY_TOTAL.labels(gpu=label).set(gpu.memory_total_bytes)
            _set_or_drop(GPU_UTILIZATION, label, _ratio(gpu.utilization_percent))
            _set_or_drop(GPU_TEMPERATURE, label, gpu.temperature_c)
            _set_or_drop(GPU_POWER, label, gpu.power_draw_w)
            _set_or_drop(GPU_POWER_LIMIT, label, gpu.power_limit_w)
        for label, name in self._seen.items():
            if current.get(label) != name:
                with contextlib.suppress(KeyError):
                    GPU_INFO.remove(label, name)
            if label not in current:
                for gauge in _GPU_GAUGES:
                    with contextlib.suppress(KeyError):
                        gauge.remove(label)
        self._seen = current
        GPU_COUNT.set(inventory.count)
        GPU_SAMPLED_AT.set(at)


def _ratio(percent: int | None) -> float | None:
    return None if percent is None else percent / 100.0


def _set_or_drop(gauge: Gauge, label: str, value: float | None) -> None:
    if value is None:
        with contextlib.suppress(KeyError):
            gauge.remove(label)
    else:
        gauge.labels(gpu=label).set(value)


class EngineSeries:
    """The engine state of every profile (one-hot), finished switch jobs, and restarts."""

    def __init__(self, control: EngineView) -> None:
        self._control = control
        self._profiles: set[str] = set()
        self._counted: deque[str] = deque(maxlen=256)  # job ids already counted
        self._restarts: dict[str, int] = {}  # restarts already counted, by profile

    def sync_state(self) -> None:
        """Set the state gauge from each engine of the fleet (profiles never run are idle)."""
        states = {e.profile_id: e.state for e in self._control.manager.engines()}
        profiles = set(self._control.profile_ids()) | set(states)
        for profile in profiles:
            current = states.get(profile, EngineState.IDLE)
            for state in EngineState:
                ENGINE_STATE.labels(profile=profile, state=state.value).set(
                    1 if state is current else 0
                )
        for gone in self._profiles - profiles:
            for state in EngineState:
                with contextlib.suppress(KeyError):
                    ENGINE_STATE.remove(gone, state.value)
        self._profiles = profiles

    def start_at_zero(self) -> None:
        """Create the switch counter at 0 for every profile and outcome, and the restart counter
        for every profile (dashboards show 0, not "no data", on a fresh gateway)."""
        for profile in self._control.profile_ids():
            for outcome in _SWITCH_OUTCOMES:
                SWITCHES.labels(profile=profile, outcome=outcome)
            ENGINE_RESTARTS.labels(profile=profile)

    def count_restarts(self) -> None:
        """Add the restarts the manager began since the last call (it keeps the totals, so an
        event lost to a full queue loses no restart)."""
        for profile, total in self._control.manager.restart_counts().items():
            new = total - self._restarts.get(profile, 0)
            if new > 0:
                ENGINE_RESTARTS.labels(profile=profile).inc(new)
                self._restarts[profile] = total

    def job_event(self, job_id: str) -> None:
        """Count a switch job once, when it has an outcome (loads, sleeps and wakes have
        their own series: gateway_fleet_operation_seconds)."""
        job = self._control.manager.job(job_id)
        if job is None or not job.done or job_id in self._counted or job.kind.value != "switch":
            return
        self._counted.append(job_id)
        outcome = job.status.value
        SWITCHES.labels(profile=job.profile_id, outcome=outcome).inc()
        if job.finished_at is not None:
            SWITCH_DURATION.labels(outcome=outcome).observe(
                max(job.finished_at - job.created_at, 0.0)
            )


class BackgroundMetrics:
    """Runs the GPU sampler and the engine-event follower for one app's lifetime."""

    def __init__(self, control: EngineView, *, gpu_interval_s: float) -> None:
        self._control = control
        self._interval_s = gpu_interval_s
        self.gpus = GpuSeries()
        self.engine = EngineSeries(control)
        self.fleet = FleetSeries(control.manager)
        self._tasks: list[asyncio.Task[None]] = []
        self._stops: list[Callable[[], None]] = []

    def start(self) -> None:
        """Start sampling GPUs and following the engines (switch, eviction and the other
        labelled counters start at 0), and read the fleet at every scrape."""
        self.engine.start_at_zero()
        self.fleet.start_at_zero(self._control.profile_ids())
        self.fleet.sync()
        self._stops = [
            self._control.manager.observe_operations(self.fleet.observe),
            refresh_before_scrape(self.refresh),
        ]
        self._tasks = [
            asyncio.create_task(self._sample_gpus(), name="metrics-gpus"),
            asyncio.create_task(self._follow_engine(), name="metrics-engine"),
        ]

    def refresh(self) -> None:
        """Bring the engines' state and the fleet's series up to date (before a scrape)."""
        self.engine.sync_state()
        self.fleet.sync()

    async def aclose(self) -> None:
        """Stop both loops and the fleet's observers; drop the fleet's claim series."""
        for stop in self._stops:
            stop()
        self._stops = []
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        self.fleet.clear()  # after the follower stopped: nothing writes them again

    async def _sample_gpus(self) -> None:
        while True:
            try:
                # NVML calls block: read in a thread so a slow driver never stalls requests.
                inventory = await asyncio.to_thread(self._control.inventory, fresh=True)
            except (OSError, ValueError) as exc:  # a snapshot file gone or broken
                log.warning("gpu_sample_failed", error=str(exc))
            else:
                self.gpus.record(inventory, time.time())
            await asyncio.sleep(self._interval_s)

    async def _follow_engine(self) -> None:
        self.engine.sync_state()
        async for event in self._control.manager.subscribe():
            self.refresh()
            self.engine.count_restarts()
            if event.job_id is not None:
                self.engine.job_event(event.job_id)
