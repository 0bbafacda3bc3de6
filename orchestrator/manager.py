"""VLLMModelManager: the fleet. Several engines resident at once, each one `ManagedEngine`
(one state machine and one lock each), placed on the GPUs by `placement.py`, parked with sleep
mode or stopped when another needs their memory, and jobs that load, unload, sleep, wake and
switch them (DESIGN.md, "The fleet").

The *default* engine is the one a request for "current" (or no model) reaches: the profile last
switched to. The single-engine views (`state`, `spec`, `handle`, `status()`, `probe()`, ...)
describe it, so code written for one engine keeps its meaning.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import os
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from dataclasses import replace
from typing import Protocol

import httpx
import structlog

from orchestrator.engine import (
    ALLOWED_TRANSITIONS,
    COMING_UP_STATES,
    EngineBusy,
    EngineConfig,
    EngineEvent,
    EngineHealth,
    EngineNotStopped,
    EngineState,
    EngineStatus,
    EngineUnavailable,
    InvalidTransition,
    JobKind,
    JobStatus,
    ManagedEngine,
    NodeLost,
    SwitchJob,
    reason_of,
)
from orchestrator.gpus import GpuInventory, engine_pids_on_nodes
from orchestrator.placement import (
    Claim,
    Ledger,
    Placement,
    available,
    check_ledger,
    choose_victims,
    claim_for,
    not_ours,
    place,
    sleep_level_for,
    start_problem,
)
from orchestrator.profiles import Profile
from orchestrator.recovery import Failure, RestartPolicy
from orchestrator.runtimes.base import EngineSpec, Runtime, RuntimeError_, RuntimeHandle

__all__ = [
    "ALLOWED_TRANSITIONS",
    "EngineBusy",
    "EngineEvent",
    "EngineHealth",
    "EngineNotStopped",
    "EngineState",
    "EngineStatus",
    "EngineUnavailable",
    "InvalidTransition",
    "JobKind",
    "JobStatus",
    "Leader",
    "NodeLost",
    "Placer",
    "SwitchJob",
    "VLLMModelManager",
]

log = structlog.get_logger(__name__)

# Builds the spec of a profile (a fresh port and key); raises when the profile cannot run here.
SpecFactory = Callable[[str], EngineSpec]

_MAX_JOBS_KEPT = 50
# How long a start on live GPUs waits for the memory it claims to be free (a stopped engine's
# memory is returned to the driver a moment after its process exits).
START_SETTLE_S = 30.0


class NoRoom(Exception):
    """The profile cannot be placed, even with every evictable engine gone."""

    def __init__(self, profile_id: str, reasons: Iterable[str]) -> None:
        self.reasons = tuple(reasons)
        super().__init__(
            f"{profile_id} does not fit beside the pinned engines: " + "; ".join(self.reasons)
        )


class Placer(Protocol):
    """What the fleet asks of the gateway to place engines on the GPUs."""

    def profile(self, profile_id: str) -> Profile:
        """A profile by id (raises when unknown)."""
        ...

    def inventory(self, *, fresh: bool = False) -> GpuInventory:
        """The GPUs as they are (a snapshot or NVML)."""
        ...

    def placed_spec(self, profile_id: str, placement: Placement | None) -> EngineSpec:
        """The spec that runs the profile where `placement` puts it (None: no GPU claim)."""
        ...

    def host_free_bytes(self) -> int:
        """Host RAM free for a level-1 sleep's weights."""
        ...


class Leader(Protocol):
    """The replica that leads the fleet, as a follower reaches it."""

    async def run_job(self, job: SwitchJob) -> None:
        """Run the job's operation on the leader and wait for its outcome (raises with the
        leader's error when it failed)."""
        ...


class VLLMModelManager:
    """Owns the engines: places, starts, drains, stops, sleeps, wakes, switches, adopts."""

    def __init__(
        self,
        *,
        http: httpx.AsyncClient,
        runtimes: Mapping[str, Runtime],
        spec_factory: SpecFactory,
        drain_timeout_s: float = 30.0,
        poll_interval_s: float = 0.25,
        restart_policy: RestartPolicy | None = None,
        placer: Placer | None = None,
        max_engines: int | None = None,
    ) -> None:
        self._config = EngineConfig(
            http=http,
            runtimes=dict(runtimes),
            drain_timeout_s=drain_timeout_s,
            poll_interval_s=poll_interval_s,
            restart_policy=restart_policy or RestartPolicy(),
            following=lambda: self._leader is not None,
        )
        # Set while another gateway replica leads the fleet: jobs are run there, and engines
        # are adopted from the registry with `known` (profile id -> spec, None: not ours).
        self._leader: Leader | None = None
        self._known: Callable[[str], EngineSpec | None] | None = None
        self._runtimes = self._config.runtimes
        self._spec_factory = spec_factory
        self._placer = placer
        self.max_engines = max_engines
        self._engines: dict[str, ManagedEngine] = {}
        self._default: str | None = None
        self._not_started: str | None = None
        self._claims: dict[str, Claim] = {}
        self._placements: dict[str, Placement] = {}
        # Sleeping engines whose wake has its room reserved (their whole claim counts).
        self._waking: set[str] = set()
        self._placing = asyncio.Lock()
        self._gpu_locks: dict[int, asyncio.Lock] = {}
        self._subscribers: set[asyncio.Queue[EngineEvent]] = set()
        self._jobs: dict[str, SwitchJob] = {}
        # Set when a job has its outcome (wait_job awaits it rather than polling).
        self._job_done: dict[str, asyncio.Event] = {}
        self._switch: SwitchJob | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._watch_interval_s: float | None = None
        self._baseline_not_ours: dict[int, int] | None = None
        # Counters the gateway's metrics read.
        self.evictions: dict[str, int] = {}
        self.ledger_mismatches = 0
        # Who is told each load, wake and sleep duration (observe_operations).
        self._operation_observers: list[Callable[[str, float], None]] = []
        self.swaps = 0

    # -- engines -----------------------------------------------------------------------------

    def engine(self, profile_id: str) -> ManagedEngine | None:
        """The engine of a profile, if the fleet has ever run it."""
        return self._engines.get(profile_id)

    def engines(self) -> list[ManagedEngine]:
        """Every engine the fleet knows, resident or not."""
        return list(self._engines.values())

    def resident(self) -> list[ManagedEngine]:
        """The engines that hold (or may hold) memory now."""
        return [e for e in self._engines.values() if e.resident]

    def claim(self, profile_id: str) -> Claim | None:
        """What a resident engine claims on the GPUs (None: none, or it uses no GPU)."""
        return self.ledger().get(profile_id)

    def ledger(self) -> Ledger:
        """Every resident engine's claim: asleep ones hold their residual, and the claim's
        last use is the engine's."""
        claims = []
        for profile_id, claim in self._claims.items():
            engine = self._engines.get(profile_id)
            if engine is None or not engine.resident:
                continue
            # Only a finished sleep frees memory; an engine being woken is counted whole from
            # the moment room was made for it (another placement must not take that room).
            asleep = engine.state is EngineState.ASLEEP and profile_id not in self._waking
            claims.append(replace(claim, asleep=asleep, last_used=engine.last_used or 0.0))
        return Ledger(tuple(claims))

    def _engine_for(self, profile_id: str) -> ManagedEngine:
        engine = self._engines.get(profile_id)
        if engine is None:
            engine = ManagedEngine(
                profile_id,
                self._config,
                respec=lambda: self._respec(profile_id),
                publish=self._publish,
            )
            self._engines[profile_id] = engine
            if self._watch_interval_s is not None:
                engine.start_watch(self._watch_interval_s)
        return engine

    def _respec(self, profile_id: str) -> EngineSpec:
        """A restart's spec: the same place as before (its claim is still in the ledger), or,
        when those GPUs are gone (their node left the cluster), a new place on the GPUs that
        remain, beside the engines there (none is evicted for it)."""
        if self._placer is None:
            return self._spec_factory(profile_id)
        claim = self._claims.get(profile_id)
        placement = self._placements.get(profile_id) if claim else None
        if placement is not None and placement.gpu_ids:
            inventory = self._placer.inventory(fresh=True)
            if not set(placement.gpu_ids) <= {gpu.index for gpu in inventory.gpus}:
                placement = self._place_elsewhere(profile_id, placement, inventory)
        return self._placer.placed_spec(profile_id, placement)

    def _place_elsewhere(
        self, profile_id: str, lost: Placement, inventory: GpuInventory
    ) -> Placement:
        """A new placement for an engine whose GPUs left the cluster; NodeLost when the
        remaining GPUs have no room for it beside the resident engines."""
        assert self._placer is not None
        profile = self._placer.profile(profile_id)
        ledger = self.ledger().without(profile_id)
        placement = place(profile, inventory, ledger, our_pids=self._our_pids(inventory))
        gone = ", ".join(str(index) for index in lost.gpu_ids)
        if not placement.placed:
            self._claims.pop(profile_id, None)
            self._placements.pop(profile_id, None)
            raise NodeLost(
                f"{profile_id}: its GPUs ({gone}) left the cluster with their node, and no "
                "remaining node has room for it: " + "; ".join(placement.reasons)
            )
        log.warning("engine_replaced", profile=profile_id, lost=gone, gpus=placement.gpu_ids)
        self._record_claim(profile, placement)
        return placement

    @property
    def default_profile_id(self) -> str | None:
        """The profile "current" names."""
        return self._default

    def _default_engine(self) -> ManagedEngine | None:
        return self._engines.get(self._default) if self._default else None

    # -- the default engine's views (what single-engine callers read) --------------------------

    @property
    def state(self) -> EngineState:
        """The default engine's state."""
        engine = self._default_engine()
        return engine.state if engine else EngineState.IDLE

    @property
    def spec(self) -> EngineSpec | None:
        """The default engine's spec."""
        engine = self._default_engine()
        return engine.spec if engine else None

    @property
    def handle(self) -> RuntimeHandle | None:
        """The default engine's runtime handle."""
        engine = self._default_engine()
        return engine.handle if engine else None

    @property
    def base_url(self) -> str | None:
        """The default engine's root URL."""
        engine = self._default_engine()
        return engine.base_url if engine else None

    @property
    def in_flight(self) -> int:
        """Requests in flight on every engine."""
        return sum(e.in_flight for e in self._engines.values())

    @property
    def current_job(self) -> SwitchJob | None:
        """The switch job in progress, if any."""
        job = self._switch
        return job if job is not None and not job.done else None

    def job_for(self, profile_id: str) -> SwitchJob | None:
        """The unfinished job acting on a profile's engine, if any."""
        engine = self._engines.get(profile_id)
        job = engine.job if engine else None
        if job is not None and not job.done:
            return job
        switch = self.current_job
        return switch if switch is not None and switch.profile_id == profile_id else None

    @property
    def restart_policy(self) -> RestartPolicy:
        """When an engine that died on its own is restarted."""
        return self._config.restart_policy

    def restart_counts(self) -> dict[str, int]:
        """Restarts begun after a crash, by profile id."""
        return {pid: e.restarts for pid, e in self._engines.items() if e.restarts}

    def status(self) -> EngineStatus:
        """The default engine's snapshot (cheap: read for every request)."""
        engine = self._default_engine()
        if engine is not None:
            return engine.status()
        reason = self._not_started
        return EngineStatus(
            profile_id=None,
            served_model_name=None,
            served_names=(),
            state=EngineState.IDLE,
            base_url=None,
            since=0.0,
            in_flight=0,
            error=reason,
            failure=Failure.NOT_STARTED if reason else None,
            reason=reason,
        )

    def job(self, job_id: str) -> SwitchJob | None:
        """A job by id (recent jobs are kept)."""
        return self._jobs.get(job_id)

    def jobs(self) -> list[SwitchJob]:
        """Recent jobs, oldest first."""
        return list(self._jobs.values())

    def logs_tail(self, lines: int = 50) -> list[str]:
        """The default engine's last log lines."""
        engine = self._default_engine()
        return engine.logs_tail(lines) if engine else []

    def observe_operations(self, observer: Callable[[str, float], None]) -> Callable[[], None]:
        """Call `observer(kind, seconds)` after every cold start ("cold": from starting the
        process until it serves or fails), wake ("wake") and sleep ("sleep"); returns the call
        that stops it. A callback, not an event: no duration is lost to a full queue."""
        self._operation_observers.append(observer)
        return lambda: self._operation_observers.remove(observer)

    def _operation_done(self, kind: str, started: float) -> None:
        seconds = time.monotonic() - started
        for observer in list(self._operation_observers):
            observer(kind, seconds)

    async def subscribe(self) -> AsyncIterator[EngineEvent]:
        """Yield every engine's events until the consumer stops iterating."""
        queue: asyncio.Queue[EngineEvent] = asyncio.Queue(maxsize=256)
        self._subscribers.add(queue)
        try:
            while True:
                yield await queue.get()
        finally:
            self._subscribers.discard(queue)

    def _publish(self, event: EngineEvent) -> None:
        for queue in self._subscribers:
            with contextlib.suppress(asyncio.QueueFull):
                queue.put_nowait(event)

    # -- serving (the default engine) ----------------------------------------------------------

    def acquire_slot(self) -> bool:
        """A slot on the default engine; False when it does not serve."""
        engine = self._default_engine()
        return engine.acquire_slot() if engine else False

    def release_slot(self) -> None:
        """Give back a slot taken with acquire_slot."""
        engine = self._default_engine()
        if engine is not None:
            engine.release_slot()

    @contextlib.asynccontextmanager
    async def serving(self) -> AsyncIterator[EngineStatus]:
        """Hold an in-flight slot on the default engine."""
        engine = self._default_engine()
        if engine is None:
            raise EngineUnavailable("no engine")
        async with engine.serving() as status:
            yield status

    async def probe(self, timeout_s: float = 2.0) -> EngineHealth:
        """The default engine's health (see ManagedEngine.probe)."""
        engine = self._default_engine()
        if engine is None:
            status = self.status()
            detail = status.reason or "engine is idle"
            return EngineHealth(
                ok=False, state=EngineState.IDLE, detail=detail, failure=status.failure
            )
        return await engine.probe(timeout_s)

    def mark_not_started(self, reason: str) -> None:
        """Record why no engine was started (e.g. the planner's verdict)."""
        engine = self._default_engine()
        if engine is None:
            self._not_started = reason
        else:
            engine.mark_not_started(reason)

    def start_watchdog(self, interval_s: float = 1.0) -> None:
        """Watch every engine (crashes, restarts, sleep) and stop idle ones after their
        idle_ttl_s."""
        if self._watch_interval_s is not None:
            return  # watching already
        self._watch_interval_s = interval_s
        for engine in self._engines.values():
            engine.start_watch(interval_s)
        if self._placer is not None:
            self._spawn(self._idle_sweeper(interval_s), "fleet-idle")

    def report_unreachable(self, profile_id: str | None = None) -> None:
        """A request could not reach an engine: check at once whether it is still alive."""
        engine = self._engines.get(profile_id) if profile_id else self._default_engine()
        if engine is not None:
            engine.report_unreachable()

    # -- single-engine operations (today's meaning) -----------------------------------------

    async def start(self, spec: EngineSpec) -> EngineStatus:
        """Stop every engine, start `spec` as the default and wait until it serves."""
        if self._placing.locked() or any(e.lock.locked() for e in self._engines.values()):
            raise EngineBusy("an engine start, stop or switch is already in progress")
        for engine in self._engines.values():
            engine.operator_acts()
        await self._stop_all(except_id=spec.profile_id)
        stuck = self._not_stopped(except_id=spec.profile_id)
        if stuck is not None:
            raise EngineNotStopped(stuck)
        engine = self._engine_for(spec.profile_id)
        self._default, self._not_started = spec.profile_id, None
        await engine.start(spec)
        return engine.status()

    async def stop(self) -> EngineStatus:
        """Drain and stop every engine (the retry after a failed stop, too)."""
        for engine in self._engines.values():
            engine.operator_acts()
        await self._stop_all(except_id=None)
        return self.status()

    def _not_stopped(self, except_id: str | None) -> str | None:
        """Why an exclusive start must not go ahead: an engine whose stop failed may still
        run and hold its GPUs (None when every other engine is stopped)."""
        for profile_id, engine in self._engines.items():
            if profile_id != except_id and engine.handle is not None:
                reason = engine.not_stopped_reason()
                engine.set_failure(Failure.NOT_STOPPED, reason)
                engine.emit(reason)
                return reason
        return None

    async def _stop_all(self, except_id: str | None) -> None:
        engines = [e for pid, e in self._engines.items() if pid != except_id]
        await asyncio.gather(*(e.stop() for e in engines))
        self._check_ledger()

    async def adopt(self, profile_ids: Callable[[str], EngineSpec | None]) -> EngineStatus | None:
        """Adopt the engines of ours that already run (labels / pid files) instead of
        reloading them; the first adopted becomes the default. None if nothing adopted."""
        for name, runtime in self._runtimes.items():
            try:
                handles = await runtime.adopt()
            except (RuntimeError_, OSError) as exc:
                # A runtime that cannot be reached (Docker daemon down) has nothing to adopt.
                log.warning("engine_adopt_skipped", runtime=name, reason=str(exc))
                continue
            for handle in handles:
                spec = profile_ids(handle.profile_id)
                existing = self._engines.get(handle.profile_id)
                held = existing.handle if existing is not None else None
                if (
                    spec is not None
                    and held is not None
                    and held.id == handle.id
                    and (held.base_url == handle.base_url)
                ):
                    # Held already (a follower mirrored it and now leads): kept as it runs.
                    self._claim_adopted(handle)
                    if self._default is None:
                        self._default = handle.profile_id
                    continue
                if spec is None or (existing is not None and existing.handle is not None):
                    log.info("engine_adopt_stop_extra", profile=handle.profile_id)
                    with contextlib.suppress(RuntimeError_, OSError):
                        await runtime.stop(handle)
                    continue
                adopting = self._engine_for(handle.profile_id)
                async with adopting.lock:
                    if not await adopting.adopt_locked(runtime, handle, spec):
                        continue
                self._claim_adopted(handle)
                if self._default is None:
                    self._default = handle.profile_id
        default = self._default_engine()
        return default.status() if default is not None and default.serves else None

    def _claim_adopted(self, handle: RuntimeHandle) -> None:
        """An adopted GPU engine's claim, as the planner places it now (on a Ray cluster, on
        the node and GPUs its actor holds)."""
        if self._placer is None:
            return
        with contextlib.suppress(Exception):
            profile = self._placer.profile(handle.profile_id)
            if profile.uses_gpu:
                inventory = self._placer.inventory()
                if handle.node_id:
                    inventory = replace(
                        inventory,
                        gpus=tuple(
                            gpu
                            for gpu in inventory.gpus
                            if gpu.node == handle.node_id and gpu.local_index in handle.node_gpu_ids
                        ),
                    )
                placement = place(profile, inventory, self.ledger())
                if placement.placed:
                    self._record_claim(profile, placement)

    # -- jobs ----------------------------------------------------------------------------------

    def request_switch(self, profile_id: str, *, exclusive: bool = False) -> SwitchJob:
        """Make `profile_id` the default engine in the background: loaded (evicting what it
        needs) or woken; `exclusive` stops every other engine first (one engine at a time).
        If it fails, the previous default stays (restarted when `exclusive` stopped it)."""
        running = self.current_job
        if running is not None:
            raise EngineBusy(
                f"a switch to {running.profile_id} is already running", job_id=running.id
            )
        engine = self._engines.get(profile_id)
        if engine is not None and engine.job is not None and not engine.job.done:
            raise EngineBusy(
                f"a {engine.job.kind.value} of {profile_id} is already running",
                job_id=engine.job.id,
            )
        job = self._new_job(JobKind.SWITCH, profile_id, exclusive=exclusive)
        self._switch = job
        self._spawn_job(job, self._run_switch(job))
        return job

    def request_load(self, profile_id: str) -> SwitchJob:
        """Load (or wake) a profile's engine beside the others; an unfinished job acting on it
        is returned instead of a new one."""
        existing = self.job_for(profile_id)
        if existing is not None:
            return existing
        job = self._new_job(JobKind.LOAD, profile_id)
        self._spawn_job(job, self._run_load(job))
        return job

    def request_unload(self, profile_id: str) -> SwitchJob:
        """Drain and stop a profile's engine."""
        return self._engine_job(JobKind.UNLOAD, profile_id, self._run_unload)

    def request_sleep(self, profile_id: str, level: int | None = None) -> SwitchJob:
        """Drain and put a profile's engine to sleep (its profile's level unless given)."""

        def run(job: SwitchJob) -> Awaitable[None]:
            job.level = level
            return self._run_sleep(job, level)

        return self._engine_job(JobKind.SLEEP, profile_id, run)

    def request_wake(self, profile_id: str) -> SwitchJob:
        """Wake a sleeping engine (a cold start when the wake fails)."""
        return self._engine_job(JobKind.WAKE, profile_id, self._run_load)

    def _engine_job(
        self,
        kind: JobKind,
        profile_id: str,
        run: Callable[[SwitchJob], Awaitable[None]],
    ) -> SwitchJob:
        busy = self.job_for(profile_id)
        if busy is not None:
            raise EngineBusy(
                f"a {busy.kind.value} of {profile_id} is already running", job_id=busy.id
            )
        job = self._new_job(kind, profile_id)
        self._spawn_job(job, run(job))
        return job

    def _new_job(self, kind: JobKind, profile_id: str, *, exclusive: bool = False) -> SwitchJob:
        job = SwitchJob(
            id=uuid.uuid4().hex[:16],
            profile_id=profile_id,
            previous_profile_id=self._default,
            kind=kind,
            exclusive=exclusive,
        )
        self._jobs[job.id] = job
        self._job_done[job.id] = asyncio.Event()
        while len(self._jobs) > _MAX_JOBS_KEPT:
            oldest = next(iter(self._jobs))
            if not self._jobs[oldest].done:
                break
            del self._jobs[oldest]
            self._job_done.pop(oldest, None)
        # The engine exists from here on, so that job_for() finds the job at once: concurrent
        # requests for one model share one load.
        self._engine_for(profile_id).job = job
        return job

    def _forget_if_never_run(self, profile_id: str) -> None:
        """Drop the engine of a profile whose job failed before anything ran (an unknown or
        unplaceable profile), so the engine list holds only engines that ran or run."""
        engine = self._engines.get(profile_id)
        if engine is not None and engine.spec is None and engine.state is EngineState.IDLE:
            del self._engines[profile_id]

    # -- replicas ------------------------------------------------------------------------------

    @property
    def following(self) -> bool:
        """True while another gateway replica leads the fleet."""
        return self._leader is not None

    def follow(self, leader: Leader, known: Callable[[str], EngineSpec | None]) -> None:
        """Another replica leads: jobs are run there, engines found dead are left to it, and
        stopping an engine only forgets it (the runtimes act on the cluster only when leading)."""
        self._leader = leader
        self._known = known

    def lead(self) -> None:
        """This replica leads the fleet from now on."""
        self._leader = None

    async def _run_on_leader(
        self, job: SwitchJob, known: Callable[[str], EngineSpec | None]
    ) -> None:
        assert self._leader is not None
        await self._leader.run_job(job)
        await self.sync(known)
        if job.kind is JobKind.UNLOAD:
            engine = self._engines.get(job.profile_id)
            if engine is not None and engine.handle is not None:
                await engine.stop()  # forget it: the leader stopped it
        engine = self._engines.get(job.profile_id)
        if job.kind in (JobKind.SWITCH, JobKind.LOAD, JobKind.WAKE) and (
            engine is None or not engine.serves
        ):
            raise RuntimeError_(
                f"the leader {job.kind.value}ed {job.profile_id}, but its engine is not in "
                "the cluster's registry"
            )
        if job.kind is JobKind.SWITCH:
            self._default = job.profile_id
        self._finish(job, JobStatus.SUCCEEDED, None)

    async def sync(self, known: Callable[[str], EngineSpec | None]) -> None:
        """A follower's view of the engines the leader runs (the registry of the runtimes that
        replicas share: the cluster's named engine actors): adopt each one not held yet, under
        the same handle the leader has, so that nothing is started; forget what this replica
        holds of an engine that was replaced."""
        for name, runtime in self._runtimes.items():
            if not getattr(runtime, "shared", False):
                continue
            try:
                handles = await runtime.adopt()
            except (RuntimeError_, OSError) as exc:
                log.warning("engine_sync_skipped", runtime=name, reason=str(exc))
                continue
            for handle in handles:
                engine = self._engines.get(handle.profile_id)
                held = engine.handle if engine is not None else None
                if held is not None and (held.id, held.base_url) == (handle.id, handle.base_url):
                    continue
                spec = known(handle.profile_id)
                if spec is None:
                    continue
                adopting = self._engine_for(handle.profile_id)
                if adopting.state is not EngineState.IDLE:
                    await adopting.stop()  # a follower's stop forgets the stale handle
                async with adopting.lock:
                    if adopting.state is not EngineState.IDLE:
                        continue
                    if not await adopting.adopt_locked(runtime, handle, spec):
                        continue
                self._claim_adopted(handle)
                if self._default is None:
                    self._default = handle.profile_id
            if self._leader is not None:
                await self._forget_unlisted(name, {(h.id, h.base_url) for h in handles})

    async def _forget_unlisted(self, runtime: str, listed: set[tuple[str, str]]) -> None:
        """A follower forgets the engines the registry no longer lists (the leader stopped,
        replaced or lost them): they show as stopped here too, not as crashed."""
        for engine in list(self._engines.values()):
            held = engine.handle
            if held is None or held.runtime != runtime or (held.id, held.base_url) in listed:
                continue
            if not engine.lock.locked():
                await engine.stop()

    def _spawn_job(self, job: SwitchJob, work: Awaitable[None]) -> None:
        if self._leader is not None and self._known is not None:
            if inspect.iscoroutine(work):
                work.close()  # this replica does not run it: the leader does
            work = self._run_on_leader(job, self._known)

        async def run() -> None:
            job.status = JobStatus.RUNNING
            try:
                await work
            except asyncio.CancelledError:
                # Shutdown (aclose): the job still gets an outcome, so nobody waits forever.
                if not job.done:
                    self._finish(job, JobStatus.FAILED, f"{job.kind.value} cancelled")
                raise
            except Exception as exc:
                # A bug or an unforeseen error must not leave the job "running": that would
                # refuse every later job with 409 until a restart.
                log.exception("job_crashed", job=job.id, profile=job.profile_id)
                engine = self._engines.get(job.profile_id)
                if engine is not None and not engine.lock.locked():
                    engine.settle_after_crash(f"{type(exc).__name__}: {exc}")
                if not job.done:
                    self._finish(
                        job, JobStatus.FAILED, f"{job.kind.value} failed: {reason_of(exc)}"
                    )

        self._spawn(run(), f"{job.kind.value}-{job.id}")

    def _spawn(self, coro: Awaitable[None], name: str) -> None:
        task: asyncio.Task[None] = asyncio.ensure_future(coro)
        task.set_name(name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def wait_job(self, job_id: str, timeout_s: float | None = None) -> SwitchJob:
        """Wait until a job has an outcome."""
        job = self._jobs[job_id]
        done = self._job_done.get(job_id)
        if job.done or done is None:
            return job
        try:
            await asyncio.wait_for(done.wait(), timeout_s)
        except TimeoutError:
            raise TimeoutError(f"{job.kind.value} job {job_id} still {job.status.value}") from None
        return job

    def _finish(self, job: SwitchJob, status: JobStatus, error: str | None) -> None:
        job.status, job.error, job.finished_at = status, error, time.time()
        done = self._job_done.get(job.id)
        if done is not None:
            done.set()
        engine = self._engines.get(job.profile_id)
        message = f"{job.kind.value} {status.value}" + (f": {error}" if error else "")
        if engine is not None:
            engine.job = job
            engine.emit(message, final=True)
        else:
            self._publish(EngineEvent(job.profile_id, EngineState.IDLE, message, job.id, 1.0))

    # -- job bodies ----------------------------------------------------------------------------

    async def _run_switch(self, job: SwitchJob) -> None:
        previous = self._default_engine()
        previous_spec = previous.spec if previous is not None and previous.serves else None
        try:
            self._build_check(job.profile_id)
        except Exception as exc:
            # Nothing was stopped yet, so the current engine keeps serving.
            self._finish(job, JobStatus.FAILED, f"cannot build engine: {reason_of(exc)}")
            self._forget_if_never_run(job.profile_id)
            return
        engine = self._engine_for(job.profile_id)
        engine.job = job
        engine.operator_acts()
        if job.exclusive:
            # One engine at a time: every other one is stopped first, and the default is the
            # new one from here on (a rollback makes the previous one the default again).
            for other in self._engines.values():
                other.operator_acts()
                if other.job is None or other.job.done:
                    other.job = job
            await self._stop_all(except_id=job.profile_id)
            stuck = self._not_stopped(except_id=job.profile_id)
            if stuck is not None:
                self._finish(job, JobStatus.FAILED, stuck)
                return
            self._default = job.profile_id
        if previous is None or previous_spec is None:
            # Nothing serves "current" meanwhile: the views (status, health, the console) follow
            # the engine being loaded, as they did before the fleet.
            self._default = job.profile_id
        try:
            await self._ensure(job, engine)
        except EngineNotStopped as exc:
            self._finish(job, JobStatus.FAILED, str(exc))
            return
        except NoRoom as exc:
            self._finish(job, JobStatus.FAILED, f"cannot build engine: {exc}")
            return
        if engine.serves:
            self._default, self._not_started = job.profile_id, None
            self._finish(job, JobStatus.SUCCEEDED, None)
            return
        job.logs = engine.logs_tail(50) or job.logs
        reason = engine.error or "engine failed to start"
        if previous is None or previous_spec is None or previous is engine:
            if previous is engine or previous is None:
                self._default = job.profile_id
            self._finish(job, JobStatus.FAILED, reason)
            return
        if previous.serves:
            # Not exclusive: the previous default kept serving beside the failed start.
            self._finish(job, JobStatus.ROLLED_BACK, reason)
            return
        engine.emit(f"rolling back to {previous.profile_id}: {reason}")
        previous.job = job
        self._default = previous.profile_id
        try:
            await self._ensure(job, previous, fallback=previous_spec)
        except (EngineNotStopped, NoRoom) as exc:
            self._finish(job, JobStatus.FAILED, f"{reason}; no rollback: {exc}")
            return
        if previous.serves:
            self._finish(job, JobStatus.ROLLED_BACK, reason)
        else:
            self._finish(job, JobStatus.FAILED, f"{reason}; rollback failed: {previous.error}")

    def _build_check(self, profile_id: str) -> None:
        """Raise what building the profile's spec raises (unknown, cannot run here) before
        anything is stopped; a GPU profile's room is found when it is placed."""
        if self._placer is None:
            self._spec_factory(profile_id)
        elif not self._placer.profile(profile_id).uses_gpu:
            self._placer.placed_spec(profile_id, None)

    async def _run_load(self, job: SwitchJob) -> None:
        engine = self._engine_for(job.profile_id)
        engine.job = job
        try:
            self._build_check(job.profile_id)
            await self._ensure(job, engine)
        except (EngineNotStopped, NoRoom) as exc:
            self._finish(job, JobStatus.FAILED, str(exc))
            return
        except Exception as exc:
            self._finish(job, JobStatus.FAILED, f"cannot build engine: {reason_of(exc)}")
            self._forget_if_never_run(job.profile_id)
            return
        if engine.serves:
            default = self._default_engine()
            if default is None or default.state in (EngineState.IDLE, EngineState.ASLEEP):
                # "current" means what is loaded when its engine was evicted (one engine at a
                # time: the model just loaded).
                self._default = job.profile_id
            self._finish(job, JobStatus.SUCCEEDED, None)
        else:
            job.logs = engine.logs_tail(50) or job.logs
            self._finish(job, JobStatus.FAILED, engine.error or "engine failed to start")

    async def _run_unload(self, job: SwitchJob) -> None:
        engine = self._engines.get(job.profile_id)
        if engine is None or not engine.resident:
            self._finish(job, JobStatus.SUCCEEDED, None)
            return
        engine.job = job
        await engine.stop()
        self._check_ledger()
        if engine.state is EngineState.IDLE:
            self._finish(job, JobStatus.SUCCEEDED, None)
        else:
            self._finish(job, JobStatus.FAILED, engine.error or "stop failed")

    async def _run_sleep(self, job: SwitchJob, level: int | None) -> None:
        engine = self._engines.get(job.profile_id)
        if engine is None or not engine.serves:
            state = engine.state.value if engine else "not loaded"
            self._finish(job, JobStatus.FAILED, f"{job.profile_id} is {state}, not ready")
            return
        engine.job = job
        wanted = level if level is not None else self._sleep_level_of(job.profile_id)
        if wanted == 0:
            self._finish(
                job,
                JobStatus.FAILED,
                f"{job.profile_id} has no sleep mode (sleep_level 0): unload it instead",
            )
            return
        started = time.monotonic()
        slept = await engine.sleep(wanted)
        self._operation_done("sleep", started)
        if slept:
            self._measure_residual(job.profile_id)
        self._check_ledger()
        if slept:
            self._finish(job, JobStatus.SUCCEEDED, None)
        else:
            self._finish(job, JobStatus.FAILED, "the sleep failed; the engine was stopped instead")

    # -- making an engine serve ---------------------------------------------------------------

    async def ensure(self, profile_id: str) -> SwitchJob:
        """Load or wake a profile's engine for a request (see request_load)."""
        return self.request_load(profile_id)

    async def _ensure(
        self, job: SwitchJob, engine: ManagedEngine, *, fallback: EngineSpec | None = None
    ) -> None:
        """Make the engine serve: as it is when READY; woken when ASLEEP (a cold start when the
        wake fails); else placed (evicting what is in the way) and started."""
        if engine.serves:
            return
        if engine.state is EngineState.ASLEEP and await self._wake(job, engine):
            return
        spec, gpu_ids = await self._place(job, engine.profile_id, fallback=fallback)
        started = time.monotonic()
        async with self._gpus_locked(gpu_ids), engine.lock:
            await engine.stop_locked()
            await self._wait_for_free_memory(self._placements.get(engine.profile_id))
            await engine.start_locked(engine.runtime_for(spec), spec)
        self._operation_done("cold", started)
        if not engine.serves:
            self._claims.pop(engine.profile_id, None)
        self._check_ledger()

    async def _wake(self, job: SwitchJob, engine: ManagedEngine) -> bool:
        """Wake a sleeping engine where it sleeps, once its whole claim fits there again (what
        stands in the way is evicted). When it cannot fit there (pinned engines), or the wake
        fails, it is stopped and False is returned: the caller places and starts it cold."""
        profile_id = engine.profile_id
        claim = self._claims.get(profile_id)
        if claim is not None and not await self._make_room_to_wake(job, claim):
            engine.emit(f"no room to wake {profile_id} on its GPUs: stopping it to start it cold")
            await engine.stop()
            return False
        gpu_ids = claim.gpu_ids if claim else ()
        started = time.monotonic()
        try:
            async with self._gpus_locked(gpu_ids), engine.lock:
                if engine.state is not EngineState.ASLEEP:
                    return engine.serves
                woke = await engine.wake_locked()
        finally:
            self._waking.discard(profile_id)
        if woke:
            self._operation_done("wake", started)
            self.swaps += 1
        self._check_ledger()
        return woke

    async def _make_room_to_wake(self, job: SwitchJob, claim: Claim) -> bool:
        """Evict what stands on a sleeping engine's GPUs until its budget fits there again, and
        reserve that room (the claim counts whole until the wake ends); False when it cannot
        fit there even with every evictable engine gone."""
        if self._placer is None:
            return True
        async with self._placing:
            inventory = self._placer.inventory(fresh=True)
            victims = self._wake_victims(claim, inventory)
            if victims is None:
                return False
            for victim in victims:
                await self._evict(job, victim, stop=False)
            self._waking.add(claim.engine_id)
            return True

    def _wake_victims(self, claim: Claim, inventory: GpuInventory) -> list[str] | None:
        """The engines to evict so that a sleeping engine's budget fits on its own GPUs again:
        idle ones first, then busy ones (drained); awake ones before sleeping ones (a sleeper
        frees only its residual), lowest priority, least recently used first. None when even
        all of them would not make room (pinned engines stand there)."""
        ledger = self.ledger().without(claim.engine_id)
        busy = self._busy()
        pids = self._our_pids(inventory)
        gpus = [gpu for gpu in inventory.gpus if gpu.index in claim.gpu_ids]
        candidates = sorted(
            (c for c in ledger.claims if not c.pinned and set(c.gpu_ids) & set(claim.gpu_ids)),
            key=lambda c: (c.engine_id in busy, c.asleep, c.priority, c.last_used, c.engine_id),
        )
        chosen: list[str] = []
        while not all(available(gpu, ledger, our_pids=pids) >= claim.bytes_per_gpu for gpu in gpus):
            if not candidates:
                return None
            victim = candidates.pop(0)
            chosen.append(victim.engine_id)
            ledger = ledger.without(victim.engine_id)
        return chosen

    async def _place(
        self, job: SwitchJob, profile_id: str, *, fallback: EngineSpec | None = None
    ) -> tuple[EngineSpec, tuple[int, ...]]:
        """Where the engine goes (evicting what must go), its spec and the GPUs it takes."""
        async with self._placing:
            if self._placer is None:
                try:
                    spec = self._spec_factory(profile_id)
                except Exception:
                    if fallback is None:
                        raise
                    spec = fallback
                await self._evict_over_cap(job, profile_id)
                return spec, ()
            profile = self._placer.profile(profile_id)
            if not profile.uses_gpu:
                await self._evict_over_cap(job, profile_id)
                self._claims.pop(profile_id, None)
                return self._placer.placed_spec(profile_id, None), ()
            placement = await self._placement_evicting(job, profile)
            self._record_claim(profile, placement)
            await self._evict_over_cap(job, profile_id)
            return self._placer.placed_spec(profile_id, placement), placement.gpu_ids

    async def _placement_evicting(self, job: SwitchJob, profile: Profile) -> Placement:
        assert self._placer is not None
        inventory = self._placer.inventory(fresh=True)
        ledger = self.ledger().without(profile.id)
        pids = self._our_pids(inventory)
        placement = place(profile, inventory, ledger, our_pids=pids, allow_reduced_context=False)
        if placement.placed:
            return placement
        eviction = choose_victims(profile, inventory, ledger, our_pids=pids, busy=self._busy())
        if eviction is None:
            # Busy engines too (drained first, bounded by the drain timeout).
            eviction = choose_victims(profile, inventory, ledger, our_pids=pids)
        if eviction is None:
            # It does not fit at its full context even alone: the longest context that fits
            # beside the pinned engines, evicting every other.
            pinned = Ledger(tuple(c for c in ledger.claims if c.pinned))
            reduced = place(profile, inventory, pinned, our_pids=pids)
            if not reduced.placed:
                raise NoRoom(profile.id, reduced.reasons)
            victims = tuple(c.engine_id for c in ledger.claims if not c.pinned)
            for victim in victims:
                await self._evict(job, victim, stop=True)
            return reduced
        for victim in eviction.victims:
            await self._evict(job, victim, stop=False)
        # A victim put to sleep keeps its residual: place again, and stop sleepers if that is
        # what stands in the way.
        ledger = self.ledger().without(profile.id)
        placement = place(profile, inventory, ledger, our_pids=pids, allow_reduced_context=False)
        if placement.placed:
            return placement
        for victim in eviction.victims:
            await self._evict(job, victim, stop=True)
        ledger = self.ledger().without(profile.id)
        placement = place(profile, inventory, ledger, our_pids=pids)
        if not placement.placed:
            raise NoRoom(profile.id, placement.reasons)
        return placement

    async def _evict_over_cap(self, job: SwitchJob, profile_id: str) -> None:
        """Stop (or sleep) the least recently used engines while the fleet is at max_engines."""
        cap = self.max_engines
        if cap is None:
            return
        while True:
            others = [e for e in self.resident() if e.profile_id != profile_id]
            awake = [e for e in others if e.state is not EngineState.ASLEEP]
            if len(awake) < cap:
                return
            candidates = [e for e in awake if not self._pinned(e.profile_id)]
            if not candidates:
                return
            victim = min(
                candidates,
                key=lambda e: (e.in_flight > 0, self._priority(e.profile_id), e.last_used or 0.0),
            )
            await self._evict(job, victim.profile_id, stop=False, reason="max_engines")

    async def _evict(
        self, job: SwitchJob, profile_id: str, *, stop: bool, reason: str = "placement"
    ) -> None:
        """Put a victim to sleep when its profile has sleep mode and the engine speaks it (level
        1 only when host RAM holds its weights), else drain and stop it."""
        engine = self._engines.get(profile_id)
        if engine is None:
            return
        if engine.lock.locked():
            # An operation in progress (a load, a wake) ends first: an engine that is waking
            # is put back to sleep, not stopped because it did not serve yet.
            async with engine.lock:
                pass
        claim = self._claims.get(profile_id)
        level = 0
        if not stop and engine.serves and engine.status().failure is None:
            wanted = self._sleep_level_of(profile_id)
            sleepable = wanted > 0 and engine.sleep_capable
            if sleepable and claim is not None and self._placer is not None:
                level = sleep_level_for(claim, wanted, self._placer.host_free_bytes())
            elif sleepable:
                level = wanted
        engine.emit(f"evicted for {job.profile_id} ({reason})")
        started = time.monotonic()
        if level:
            slept = await engine.sleep(level)
            self._operation_done("sleep", started)
            if slept:
                self._measure_residual(profile_id)
                self.evictions[f"{reason}_sleep"] = self.evictions.get(f"{reason}_sleep", 0) + 1
                return
        if engine.state is EngineState.IDLE:
            return
        engine.operator_acts()
        await engine.stop()
        self.evictions[f"{reason}_stop"] = self.evictions.get(f"{reason}_stop", 0) + 1

    def _busy(self) -> set[str]:
        """Engines that cannot be evicted without waiting: requests in flight, or a job on it."""
        return {
            pid
            for pid, e in self._engines.items()
            if e.in_flight or e.lock.locked() or e.state in COMING_UP_STATES
        }

    def victims_for(self, profile_id: str) -> tuple[str, ...] | None:
        """The engines that loading `profile_id` now would evict (empty: it fits beside them;
        None: it cannot be placed at its full context at all). The scheduler's no-thrash rule
        reads it before asking for a load."""
        if self._placer is None:
            return self._cap_victims(profile_id)
        try:
            profile = self._placer.profile(profile_id)
        except Exception:
            return None
        if not profile.uses_gpu:
            return self._cap_victims(profile_id)
        engine = self._engines.get(profile_id)
        if engine is not None and engine.state is EngineState.ASLEEP:
            claim = self._claims.get(profile_id)
            if claim is not None:
                woken = self._wake_victims(claim, self._placer.inventory())
                if woken is not None:
                    return tuple(woken)
                # No room where it sleeps: it is started cold wherever the placement finds.
        inventory = self._placer.inventory()
        ledger = self.ledger().without(profile_id)
        pids = self._our_pids(inventory)
        if place(profile, inventory, ledger, our_pids=pids, allow_reduced_context=False).placed:
            return self._cap_victims(profile_id)
        eviction = choose_victims(profile, inventory, ledger, our_pids=pids)
        return eviction.victims if eviction is not None else None

    def _cap_victims(self, profile_id: str) -> tuple[str, ...]:
        cap = self.max_engines
        if cap is None:
            return ()
        awake = [
            e
            for e in self.resident()
            if e.profile_id != profile_id and e.state is not EngineState.ASLEEP
        ]
        if len(awake) < cap:
            return ()
        candidates = [e for e in awake if not self._pinned(e.profile_id)]
        if not candidates:
            return ()
        victim = min(candidates, key=lambda e: (self._priority(e.profile_id), e.last_used or 0.0))
        return (victim.profile_id,)

    def _record_claim(self, profile: Profile, placement: Placement) -> None:
        self._claims[profile.id] = claim_for(placement, profile, last_used=time.time())
        self._placements[profile.id] = placement

    def _profile(self, profile_id: str) -> Profile | None:
        if self._placer is None:
            return None
        try:
            return self._placer.profile(profile_id)
        except Exception:
            return None

    def _uses_gpu(self, profile_id: str) -> bool:
        profile = self._profile(profile_id)
        return profile is not None and profile.uses_gpu

    def _pinned(self, profile_id: str) -> bool:
        profile = self._profile(profile_id)
        return profile is not None and profile.pinned

    def _priority(self, profile_id: str) -> int:
        profile = self._profile(profile_id)
        return profile.priority if profile is not None else 0

    def _sleep_level_of(self, profile_id: str) -> int:
        profile = self._profile(profile_id)
        return profile.sleep_level if profile is not None else 0

    def our_pids(self, inventory: GpuInventory | None = None) -> tuple[int, ...]:
        """The GPU processes of this reading that are our engines' (what placement does not
        count as memory held by others)."""
        return self._our_pids(inventory)

    def _our_pids(self, inventory: GpuInventory | None = None) -> tuple[int, ...]:
        """The pids of our process engines as NVML lists them: a process engine is started in
        its own process group (its handle's id), and vLLM's GPU work runs in its children, so a
        GPU process whose group is one of ours is ours."""
        groups = {pid: e.profile_id for pid, e in self._process_groups().items()}
        pids = set(groups)
        for gpu in inventory.gpus if inventory is not None else ():
            for process in gpu.processes:
                if not gpu.node and _group_of(process.pid) in groups:
                    pids.add(process.pid)
        if inventory is not None:
            # Engines on Ray nodes: their groups were read on their nodes.
            remote = [
                (handle.node_id, handle.pid)
                for engine in self._engines.values()
                if (handle := engine.handle) is not None and handle.node_id and handle.pid
            ]
            pids |= engine_pids_on_nodes(inventory, remote)
        return tuple(sorted(pids))

    def _process_groups(self) -> dict[int, ManagedEngine]:
        groups = {}
        for engine in self._engines.values():
            handle = engine.handle
            if handle is not None and handle.runtime == "process" and handle.id.isdigit():
                groups[int(handle.id)] = engine
        return groups

    def _measure_residual(self, profile_id: str) -> None:
        """After a sleep, where NVML is live: what the engine's processes still hold on each
        of its GPUs becomes its residual in the ledger (instead of SLEEP_RESIDUAL_BYTES)."""
        claim = self._claims.get(profile_id)
        engine = self._engines.get(profile_id)
        if self._placer is None or claim is None or engine is None or engine.handle is None:
            return
        inventory = self._placer.inventory(fresh=True)
        if inventory.source != "nvml" or not engine.handle.id.isdigit():
            return
        group = int(engine.handle.id)
        held = [
            sum(p.used_memory_bytes for p in gpu.processes if _group_of(p.pid) == group)
            for gpu in inventory.gpus
            if gpu.index in claim.gpu_ids
        ]
        if held and max(held) > 0:
            self._claims[profile_id] = replace(claim, residual_bytes_per_gpu=max(held))
            log.info("sleep_residual_measured", profile=profile_id, bytes_per_gpu=max(held))

    async def _wait_for_free_memory(self, placement: Placement | None) -> None:
        """Before a start on live GPUs: vLLM checks its gpu_memory_utilization against the memory
        free at that moment, and a just-stopped engine's memory takes a moment to be returned;
        wait (bounded) until the GPUs have the claim free, else start and let vLLM say why."""
        if self._placer is None or placement is None:
            return
        deadline = time.monotonic() + START_SETTLE_S
        while True:
            inventory = self._placer.inventory(fresh=True)
            if inventory.source != "nvml":
                return
            problem = start_problem(placement, inventory)
            if problem is None:
                return
            if time.monotonic() > deadline:
                log.warning("engine_start_memory_not_free", reason=problem)
                return
            await asyncio.sleep(0.5)

    @contextlib.asynccontextmanager
    async def _gpus_locked(self, gpu_ids: Iterable[int]) -> AsyncIterator[None]:
        """One start (or wake) at a time per GPU: vLLM sizes its budget against the memory
        free when it starts, so two engines starting on one GPU would each count the other's
        half-made allocation as taken (vllm-project/vllm#14376, #10533)."""
        async with contextlib.AsyncExitStack() as stack:
            for gpu in sorted(set(gpu_ids)):
                lock = self._gpu_locks.setdefault(gpu, asyncio.Lock())
                await stack.enter_async_context(lock)
            yield

    def _check_ledger(self) -> None:
        """After every start and stop: does NVML agree with the ledger? A mismatch is logged
        and counted (a snapshot reading is static, so there is nothing to compare)."""
        if self._placer is None:
            return
        inventory = self._placer.inventory(fresh=True)
        if inventory.source != "nvml" or not inventory.gpus:
            return
        ledger = self.ledger()
        if self._baseline_not_ours is None:
            pids = self._our_pids(inventory)
            self._baseline_not_ours = {g.index: not_ours(g, pids) for g in inventory.gpus}
        result = check_ledger(ledger, inventory, baseline_not_ours=self._baseline_not_ours)
        for mismatch in result.mismatches:
            self.ledger_mismatches += 1
            log.warning(
                "ledger_mismatch",
                gpu=mismatch.gpu_id,
                nvml_used_bytes=mismatch.nvml_used_bytes,
                expected_bytes=mismatch.expected_bytes,
            )

    # -- idle engines ----------------------------------------------------------------------------

    async def _idle_sweeper(self, interval_s: float) -> None:
        while True:
            await asyncio.sleep(interval_s)
            await self.sweep_idle()

    async def sweep_idle(self, now: float | None = None) -> list[str]:
        """Put to sleep (or stop) every READY engine unused for longer than its idle_ttl_s;
        the profiles acted on."""
        now = time.time() if now is None else now
        acted: list[str] = []
        if self._leader is not None:
            return acted  # the leader sweeps the fleet
        for engine in list(self._engines.values()):
            profile = self._profile(engine.profile_id)
            ttl = profile.idle_ttl_s if profile is not None else None
            if (
                ttl is None
                or not engine.serves
                or engine.in_flight
                or engine.lock.locked()
                or self.job_for(engine.profile_id) is not None
                or now - (engine.last_used or now) < ttl
            ):
                continue
            job = self._new_job(JobKind.SLEEP, engine.profile_id)
            job.status = JobStatus.RUNNING
            await self._evict(job, engine.profile_id, stop=False, reason="idle")
            slept = engine.state is EngineState.ASLEEP
            self._finish(job, JobStatus.SUCCEEDED, "idle: " + ("asleep" if slept else "stopped"))
            acted.append(engine.profile_id)
        return acted

    async def aclose(self, *, stop_engines: bool = True) -> None:
        """Cancel jobs and stop every engine on shutdown (unless `stop_engines` is False:
        replicas leave the fleet's engines to the next leader)."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for engine in self._engines.values():
            await engine.aclose()
        if stop_engines:
            with contextlib.suppress(InvalidTransition):
                await self.stop()


def _group_of(pid: int) -> int | None:
    """A process's group, None when it cannot be read (gone, or in another pid namespace)."""
    try:
        return os.getpgid(pid)
    except OSError:
        return None
