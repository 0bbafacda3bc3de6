"""VLLMModelManager: the one state machine of an engine's life, and switch jobs (DESIGN.md)."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field, replace
from enum import StrEnum

import httpx
import structlog

from orchestrator.recovery import PUBLIC_REASONS, CrashWindow, Failure, RestartPolicy
from orchestrator.runtimes.base import EngineSpec, Runtime, RuntimeError_, RuntimeHandle

log = structlog.get_logger(__name__)


class EngineState(StrEnum):
    """Where the engine is in its life."""

    IDLE = "idle"
    STARTING = "starting"
    LOADING = "loading"
    READY = "ready"
    DRAINING = "draining"
    STOPPING = "stopping"
    RESTARTING = "restarting"
    FAILED = "failed"


# The only transitions the manager makes; anything else is a bug and raises.
ALLOWED_TRANSITIONS: Mapping[EngineState, frozenset[EngineState]] = {
    EngineState.IDLE: frozenset({EngineState.STARTING, EngineState.LOADING}),
    # STARTING/LOADING -> RESTARTING: a restart after a crash failed too; another one waits.
    EngineState.STARTING: frozenset(
        {EngineState.LOADING, EngineState.FAILED, EngineState.RESTARTING}
    ),
    EngineState.LOADING: frozenset({EngineState.READY, EngineState.FAILED, EngineState.RESTARTING}),
    # READY -> RESTARTING: the engine died while serving and the restart policy allows a restart;
    # READY -> FAILED: it died and is not restarted (restarts off, or a crash loop).
    EngineState.READY: frozenset(
        {EngineState.DRAINING, EngineState.FAILED, EngineState.RESTARTING}
    ),
    # DRAINING -> FAILED: a switch that crashes mid-drain (the engine may still run; FAILED keeps
    # its handle, so it is stopped before anything else starts).
    EngineState.DRAINING: frozenset({EngineState.STOPPING, EngineState.FAILED}),
    EngineState.STOPPING: frozenset({EngineState.IDLE, EngineState.FAILED}),
    # RESTARTING -> STARTING without passing IDLE: requests held for the restart keep waiting
    # (an IDLE engine refuses them). RESTARTING -> STOPPING: stop() or a switch cancels the
    # restart. RESTARTING -> FAILED: the dead engine's remains could not be removed.
    EngineState.RESTARTING: frozenset(
        {EngineState.STARTING, EngineState.STOPPING, EngineState.FAILED}
    ),
    EngineState.FAILED: frozenset({EngineState.STARTING, EngineState.STOPPING}),
}

# vLLM's sleep contract (served with VLLM_SERVER_DEV_MODE=1; the simulator always serves it):
# GET /is_sleeping -> {"is_sleeping": bool}. An engine that answers it is watched for sleep.
SLEEP_STATE_PATH = "/is_sleeping"

# States in which an engine process/container may exist and must be stopped before another.
_HAS_ENGINE = frozenset({EngineState.READY, EngineState.FAILED})


class InvalidTransition(Exception):
    """A state change that the state machine does not allow."""


class EngineBusy(Exception):
    """Another start, stop or switch is in progress."""

    def __init__(self, message: str, job_id: str | None = None) -> None:
        super().__init__(message)
        self.job_id = job_id


class EngineUnavailable(Exception):
    """No engine is ready to serve a request."""


class EngineNotStopped(Exception):
    """The previous engine could not be confirmed stopped, so no other engine is started.

    Its process or container may still hold its GPUs; starting another one over it would lose
    its handle and leave it running with nobody to stop it. A stop that succeeds clears this.
    """


class JobStatus(StrEnum):
    """The outcome of a switch job."""

    PENDING = "pending"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    ROLLED_BACK = "rolled_back"
    FAILED = "failed"


@dataclass(frozen=True)
class EngineEvent:
    """A progress event: a state change or a step inside a switch."""

    profile_id: str
    state: EngineState
    message: str
    job_id: str | None = None
    progress: float | None = None
    at: float = field(default_factory=time.time)


@dataclass(frozen=True)
class EngineStatus:
    """A point-in-time view of the managed engine.

    `error` is the admin's detail and may quote the engine's output (its last log line names
    its port and paths); `failure` and `reason` are what users and the public are told: a
    stable code and its fixed sentence (or the gateway's own reason why none was started).
    """

    profile_id: str | None
    served_model_name: str | None
    served_names: tuple[str, ...]
    state: EngineState
    base_url: str | None
    since: float
    in_flight: int
    error: str | None = None
    failure: Failure | None = None
    reason: str | None = None
    # READY, but the engine says it is asleep (vLLM's sleep mode): it serves nothing until woken.
    asleep: bool = False
    # Crashes within the restart policy's window, and when the next restart begins (RESTARTING).
    recent_crashes: int = 0
    restart_at: float | None = None
    # The engine's last log lines when it last failed or crashed (admins only).
    logs: tuple[str, ...] = ()


@dataclass(frozen=True)
class EngineHealth:
    """The outcome of one health probe; `detail` is safe to show to anyone (never engine
    output), `failure` the stable code when the engine does not serve."""

    ok: bool
    state: EngineState
    detail: str
    latency_ms: float | None = None
    failure: Failure | None = None


@dataclass
class SwitchJob:
    """A background switch from the current engine to another profile."""

    id: str
    profile_id: str
    previous_profile_id: str | None
    status: JobStatus = JobStatus.PENDING
    created_at: float = field(default_factory=time.time)
    finished_at: float | None = None
    error: str | None = None
    logs: list[str] = field(default_factory=list)
    events: list[EngineEvent] = field(default_factory=list)

    @property
    def done(self) -> bool:
        """True once the job has an outcome."""
        return self.status not in (JobStatus.PENDING, JobStatus.RUNNING)


# Builds the spec of a profile on a given host port; raises when the profile cannot run here.
SpecFactory = Callable[[str], EngineSpec]

# Progress reported while an engine loads (STARTING and LOADING cover 0..1 of a switch).
_PROGRESS = {
    EngineState.DRAINING: 0.1,
    EngineState.STOPPING: 0.2,
    EngineState.IDLE: 0.3,
    EngineState.STARTING: 0.4,
    EngineState.LOADING: 0.5,
    EngineState.READY: 1.0,
}

_MAX_JOBS_KEPT = 50


class VLLMModelManager:
    """Owns the engine: starts, drains, stops, switches, adopts; one state machine."""

    def __init__(
        self,
        *,
        http: httpx.AsyncClient,
        runtimes: Mapping[str, Runtime],
        spec_factory: SpecFactory,
        drain_timeout_s: float = 30.0,
        poll_interval_s: float = 0.25,
        restart_policy: RestartPolicy | None = None,
    ) -> None:
        self._http = http
        self._runtimes = dict(runtimes)
        self._spec_factory = spec_factory
        self._drain_timeout_s = drain_timeout_s
        self._poll_interval_s = poll_interval_s
        self._lock = asyncio.Lock()
        self._state = EngineState.IDLE
        self._since = time.time()
        self._spec: EngineSpec | None = None
        self._handle: RuntimeHandle | None = None
        self._served_names: tuple[str, ...] = ()
        self._error: str | None = None
        self._failure: Failure | None = None
        self._reason: str | None = None
        self._last_logs: tuple[str, ...] = ()
        # Sleep: whether the engine answers GET /is_sleeping (learned when it becomes ready),
        # and what it said last.
        self._sleep_capable = False
        self._asleep = False
        # Restarts: the policy, the crash window, the pending restart (a task that waits out the
        # backoff; the generation invalidates one that an operator's action superseded).
        self._restart_policy = restart_policy or RestartPolicy()
        self._crashes = CrashWindow(self._restart_policy)
        self._restart_at: float | None = None
        self._restart_task: asyncio.Task[None] | None = None
        self._restart_generation = 0
        self._restarts: dict[str, int] = {}
        self._subscribers: set[asyncio.Queue[EngineEvent]] = set()
        self._in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._jobs: dict[str, SwitchJob] = {}
        self._job: SwitchJob | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    # -- views -------------------------------------------------------------------------------

    @property
    def state(self) -> EngineState:
        """The current state."""
        return self._state

    @property
    def spec(self) -> EngineSpec | None:
        """The spec of the engine being run (or last run)."""
        return self._spec

    @property
    def handle(self) -> RuntimeHandle | None:
        """The runtime's handle of the running engine."""
        return self._handle

    @property
    def base_url(self) -> str | None:
        """The engine's root URL while it has one."""
        return self._handle.base_url if self._handle else None

    @property
    def in_flight(self) -> int:
        """Requests holding a slot on the engine."""
        return self._in_flight

    @property
    def current_job(self) -> SwitchJob | None:
        """The switch job in progress, if any."""
        return self._job if self._job and not self._job.done else None

    @property
    def restart_policy(self) -> RestartPolicy:
        """When an engine that died on its own is restarted."""
        return self._restart_policy

    def restart_counts(self) -> dict[str, int]:
        """Restarts begun after a crash since the manager was created, by profile id."""
        return dict(self._restarts)

    def status(self) -> EngineStatus:
        """A snapshot of what is running (cheap: the proxy reads it for every request)."""
        asleep = self._asleep and self._state is EngineState.READY
        return EngineStatus(
            profile_id=self._spec.profile_id if self._spec else None,
            served_model_name=self._spec.served_model_name if self._spec else None,
            served_names=self._served_names,
            state=self._state,
            base_url=self.base_url,
            since=self._since,
            in_flight=self._in_flight,
            error=self._error,
            failure=Failure.ASLEEP if asleep else self._failure,
            reason=self._public_reason(),
            asleep=asleep,
            recent_crashes=self._crashes.count(time.monotonic()),
            restart_at=self._restart_at if self._state is EngineState.RESTARTING else None,
            logs=self._last_logs,
        )

    def _public_reason(self) -> str | None:
        """What users and the public are told about why the engine does not serve."""
        if self._asleep and self._state is EngineState.READY:
            return PUBLIC_REASONS[Failure.ASLEEP]
        if self._failure is None:
            return None
        return self._reason or PUBLIC_REASONS[self._failure]

    def _set_failure(
        self, failure: Failure | None, detail: str | None, reason: str | None = None
    ) -> None:
        """Record why the engine does not serve: the code, the admin's detail, and (only when
        the gateway wrote it) a public reason other than the code's fixed sentence."""
        self._failure, self._error, self._reason = failure, detail, reason

    def job(self, job_id: str) -> SwitchJob | None:
        """A switch job by id (recent jobs are kept)."""
        return self._jobs.get(job_id)

    def logs_tail(self, lines: int = 50) -> list[str]:
        """The engine's last log lines (empty for engines the gateway does not run)."""
        if self._handle is None:
            return []
        runtime = self._runtimes.get(self._handle.runtime)
        return runtime.logs_tail(self._handle, lines) if runtime else []

    async def subscribe(self) -> AsyncIterator[EngineEvent]:
        """Yield progress events until the consumer stops iterating."""
        queue: asyncio.Queue[EngineEvent] = asyncio.Queue(maxsize=256)
        self._subscribers.add(queue)
        try:
            while True:
                yield await queue.get()
        finally:
            self._subscribers.discard(queue)

    # -- serving -----------------------------------------------------------------------------

    def acquire_slot(self) -> bool:
        """Count one in-flight request on the ready engine; False when it is not ready (or
        asleep)."""
        if self._state is not EngineState.READY or self._handle is None or self._asleep:
            return False
        self._in_flight += 1
        self._idle.clear()
        return True

    def release_slot(self) -> None:
        """Give back a slot taken with acquire_slot (a draining switch waits for these)."""
        self._in_flight -= 1
        if self._in_flight <= 0:
            self._in_flight = 0
            self._idle.set()

    @contextlib.asynccontextmanager
    async def serving(self) -> AsyncIterator[EngineStatus]:
        """Hold an in-flight slot on the ready engine; a switch drains these before stopping."""
        if not self.acquire_slot():
            raise EngineUnavailable(f"engine is {self._state.value}")
        try:
            yield self.status()
        finally:
            self.release_slot()

    async def probe(self, timeout_s: float = 2.0) -> EngineHealth:
        """One health request to the engine (used by /health/ready), and for an engine with
        vLLM's sleep contract whether it is asleep: an engine that is asleep serves nothing,
        so it is not healthy. The detail never quotes the engine (the public reads it)."""
        handle, spec = self._handle, self._spec
        if self._state is not EngineState.READY or handle is None or spec is None:
            detail = self._public_reason() or f"engine is {self._state.value}"
            return EngineHealth(ok=False, state=self._state, detail=detail, failure=self._failure)
        started = time.perf_counter()
        try:
            response = await self._http.get(handle.base_url + spec.health_path, timeout=timeout_s)
        except httpx.HTTPError as exc:
            detail = f"unreachable ({type(exc).__name__})"
            return EngineHealth(ok=False, state=self._state, detail=detail)
        latency = round((time.perf_counter() - started) * 1000, 2)
        if response.status_code != 200:
            detail = f"health returned {response.status_code}"
            return EngineHealth(ok=False, state=self._state, detail=detail, latency_ms=latency)
        if self._sleep_capable:
            asleep = await self._sleep_state(handle, spec, timeout_s)
            if asleep is not None and self._handle is handle and self._is_ready():
                self._set_asleep(asleep)
            if self._asleep:
                return EngineHealth(
                    ok=False,
                    state=self._state,
                    detail=PUBLIC_REASONS[Failure.ASLEEP],
                    latency_ms=latency,
                    failure=Failure.ASLEEP,
                )
        return EngineHealth(ok=True, state=self._state, detail="healthy", latency_ms=latency)

    async def _sleep_state(
        self, handle: RuntimeHandle, spec: EngineSpec, timeout_s: float
    ) -> bool | None:
        """The engine's GET /is_sleeping answer; None when it has no such route or did not
        answer (vLLM serves it only in its dev mode; other engines not at all)."""
        try:
            response = await self._http.get(
                handle.base_url + SLEEP_STATE_PATH, headers=_auth(spec), timeout=timeout_s
            )
            if response.status_code != 200:
                return None
            value = response.json().get("is_sleeping")
        except (httpx.HTTPError, ValueError, AttributeError):
            return None
        return value if isinstance(value, bool) else None

    def _set_asleep(self, asleep: bool) -> None:
        """Follow what the engine says of its sleep; say so once when it changes."""
        if asleep == self._asleep:
            return
        self._asleep = asleep
        log.warning("engine_sleep", profile=self._profile_label(), asleep=asleep)
        self._emit(
            "the engine is asleep: requests get 503 until it is woken up (POST /wake_up)"
            if asleep
            else "the engine woke up and serves again"
        )

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self, spec: EngineSpec) -> EngineStatus:
        """Start `spec` (stopping what runs) and wait until it serves; FAILED with the reason.

        Raises EngineNotStopped, starting nothing, when the running engine cannot be stopped.
        """
        runtime = self._runtime_for(spec)
        if self._lock.locked():
            raise EngineBusy("an engine start, stop or switch is already in progress")
        self._operator_acts()
        async with self._lock:
            await self._stop_locked()
            await self._start_locked(runtime, spec)
            return self.status()

    async def stop(self) -> EngineStatus:
        """Drain and stop the engine if one runs (FAILED with the reason when the stop fails).

        Also the retry after a failed stop: once it succeeds, engines may be started again.
        A pending restart is cancelled (one in progress is cut short): stopped means stopped.
        """
        self._operator_acts()
        async with self._lock:
            await self._stop_locked()
            return self.status()

    async def adopt(self, profile_ids: Callable[[str], EngineSpec | None]) -> EngineStatus | None:
        """Adopt an engine of ours that already runs (labels / pid files) instead of reloading.

        `profile_ids` maps an adopted engine's profile id to the spec it should match (None when
        that profile is unknown now: such engines are stopped). Returns None if nothing adopted.
        """
        async with self._lock:
            adopted: EngineStatus | None = None
            for name, runtime in self._runtimes.items():
                try:
                    handles = await runtime.adopt()
                except (RuntimeError_, OSError) as exc:
                    # A runtime that cannot be reached (Docker daemon down) has nothing to adopt;
                    # the gateway still starts and a later start on that runtime reports the error.
                    log.warning("engine_adopt_skipped", runtime=name, reason=str(exc))
                    continue
                for handle in handles:
                    spec = profile_ids(handle.profile_id)
                    # A handle still held is an earlier one whose stop failed: never overwrite it.
                    if adopted is not None or spec is None or self._handle is not None:
                        log.info("engine_adopt_stop_extra", profile=handle.profile_id)
                        with contextlib.suppress(RuntimeError_, OSError):
                            await runtime.stop(handle)
                        continue
                    # The engine keeps the API key it was started with (the runtime read it back);
                    # the spec just built carries a new one, which the engine would refuse.
                    spec = replace(spec, api_key=handle.api_key)
                    self._spec, self._handle = spec, handle
                    self._set_failure(None, None)
                    self._enter(EngineState.LOADING, f"adopting running {spec.served_model_name}")
                    try:
                        await self._wait_serving(runtime, spec)
                    except (RuntimeError_, TimeoutError, httpx.HTTPError) as exc:
                        await self._abort_start(runtime, f"adopted engine unhealthy: {exc}")
                        await self._stop_locked()
                        continue
                    self._enter(EngineState.READY, f"adopted {spec.served_model_name}")
                    adopted = self.status()
            return adopted

    def mark_not_started(self, reason: str) -> None:
        """Record why no engine was started (e.g. the planner's verdict) while IDLE.

        status().error, probe() and so the health check, the API's 503s and the console then
        say why nothing serves instead of a bare "idle"; the next start clears it. In any other
        state the state's own error already says more, and it is kept.
        """
        if self._state is EngineState.IDLE:
            # The gateway wrote this reason from the validated profiles and the GPU reading,
            # not from an engine's output: it is also what users and the public are told.
            self._set_failure(Failure.NOT_STARTED, reason, reason)

    def request_switch(self, profile_id: str) -> SwitchJob:
        """Start a background switch to `profile_id`; refuse while another one runs.

        The caller checks that the profile exists and fits before calling this.
        """
        running = self.current_job
        if running is not None or self._lock.locked():
            job_id = running.id if running else None
            target = running.profile_id if running else "another operation"
            raise EngineBusy(f"a switch to {target} is already running", job_id=job_id)
        # A switch supersedes a restart that waits out its backoff (the switch stops first).
        self._operator_acts()
        job = SwitchJob(
            id=uuid.uuid4().hex[:16],
            profile_id=profile_id,
            previous_profile_id=self._spec.profile_id if self._spec else None,
        )
        self._remember(job)
        self._job = job
        task = asyncio.create_task(self._run_switch(job), name=f"switch-{job.id}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return job

    async def wait_job(self, job_id: str, timeout_s: float | None = None) -> SwitchJob:
        """Wait until a switch job has an outcome."""
        job = self._jobs[job_id]
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while not job.done:
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"switch job {job_id} still {job.status.value}")
            await asyncio.sleep(0.05)
        return job

    def start_watchdog(self, interval_s: float = 1.0) -> None:
        """Notice an engine that died while READY (crash, OOM kill) and restart it (or mark it
        FAILED, per the restart policy); follow whether a sleep-capable engine is asleep."""
        task = asyncio.create_task(self._watch(interval_s), name="engine-watchdog")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def report_unreachable(self) -> None:
        """A request could not reach the engine: check at once whether it is still alive."""
        if self._state is EngineState.READY and not self._lock.locked():
            task = asyncio.create_task(self._check_alive(), name="engine-check")
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _watch(self, interval_s: float) -> None:
        while True:
            await asyncio.sleep(interval_s)
            await self._check_alive()

    async def _check_alive(self) -> None:
        handle, spec = self._handle, self._spec
        if (
            self._state is not EngineState.READY
            or handle is None
            or spec is None
            or self._lock.locked()
        ):
            return
        runtime = self._runtimes.get(handle.runtime)
        if runtime is None:
            return
        if await runtime.is_running(handle):
            if self._sleep_capable:
                asleep = await self._sleep_state(handle, spec, timeout_s=1.0)
                if asleep is not None and self._handle is handle and self._is_ready():
                    self._set_asleep(asleep)
            return
        # Re-check after the await: a switch may have replaced the engine meanwhile.
        if self._handle is handle and self._state is EngineState.READY:
            self._last_logs = tuple(self.logs_tail(50))
            detail = f"engine exited while serving: {self._last_log_line()}"
            log.warning("engine_died", profile=self._profile_label(), logs=self._last_logs[-20:])
            self._after_crash(detail)

    # -- restarts (DESIGN.md, "Restarts") -----------------------------------------------------

    def _operator_acts(self) -> None:
        """A start, stop or switch: it decides what runs now, so a pending restart is dropped
        and earlier crashes no longer count towards a crash loop."""
        self._restart_generation += 1
        task, self._restart_task = self._restart_task, None
        if task is not None and task is not asyncio.current_task():
            task.cancel()
        self._crashes.clear()

    def _after_crash(self, detail: str) -> None:
        """The engine died on its own (while serving, or during a restart's start): restart it
        after a backoff, or stay FAILED when restarts are off or it crashes in a loop."""
        policy = self._restart_policy
        crashes = self._crashes.record(time.monotonic())
        if not policy.enabled:
            self._set_failure(Failure.CRASHED, detail)
            self._enter(EngineState.FAILED, detail)
            return
        if self._crashes.is_loop(crashes):
            detail = (
                f"crash loop: the engine crashed {crashes} times within {policy.window_s:g}s "
                f"(at most {policy.max_restarts} restarts), so it is not restarted again; "
                f"last crash: {detail}. Switch to it again once the cause is fixed"
            )
            log.error("engine_crash_loop", profile=self._profile_label(), crashes=crashes)
            self._set_failure(Failure.CRASH_LOOP, detail)
            self._enter(EngineState.FAILED, detail)
            return
        delay = policy.delay_s(crashes)
        self._set_failure(Failure.RESTARTING, detail)
        self._restart_at = time.time() + delay
        self._enter(
            EngineState.RESTARTING,
            f"{detail}; restart {crashes} of at most {policy.max_restarts} "
            f"within {policy.window_s:g}s in {delay:g}s",
        )
        self._restart_generation += 1
        task = asyncio.create_task(
            self._restart_after(delay, self._restart_generation), name="engine-restart"
        )
        self._restart_task = task
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _restart_after(self, delay_s: float, generation: int) -> None:
        await asyncio.sleep(delay_s)
        async with self._lock:
            # A start, stop or switch since (or a newer restart) has decided otherwise.
            if generation != self._restart_generation or self._state is not (
                EngineState.RESTARTING
            ):
                return
            await self._restart_locked()

    async def _restart_locked(self) -> None:
        """Remove what is left of the dead engine, then start its profile again."""
        assert self._spec is not None
        previous = self._spec
        handle = self._handle
        if handle is not None:
            runtime = self._runtimes.get(handle.runtime)
            try:
                if runtime is not None:
                    # A dead process still has a state file, a container still exists: a stop
                    # removes them. One that fails keeps the handle (no start over it).
                    await runtime.stop(handle)
            except Exception as exc:
                detail = (
                    f"the crashed engine ({self._profile_label()}, {handle.runtime} {handle.id}) "
                    f"could not be cleaned up (stop failed: {_reason(exc)}), so it is not "
                    "restarted. Retry the stop (a new switch retries it first)"
                )
                self._set_failure(Failure.NOT_STOPPED, detail)
                self._enter(EngineState.FAILED, detail)
                return
            self._handle = None
        try:
            # A fresh spec: a new port and API key, planned against the GPUs as they are now.
            spec = self._spec_factory(previous.profile_id)
            runtime = self._runtime_for(spec)
        except Exception as exc:
            # The profile changed or no longer fits: what ran before is the best bet.
            log.warning("engine_restart_respec_failed", profile=previous.profile_id, error=str(exc))
            spec, runtime = previous, self._runtime_for(previous)
        self._restart_at = None
        self._restarts[spec.profile_id] = self._restarts.get(spec.profile_id, 0) + 1
        await self._start_locked(runtime, spec, restart=True)

    async def aclose(self) -> None:
        """Cancel switch jobs and stop the engine on shutdown."""
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        with contextlib.suppress(InvalidTransition):
            await self.stop()

    # -- switch ------------------------------------------------------------------------------

    async def _run_switch(self, job: SwitchJob) -> None:
        job.status = JobStatus.RUNNING
        try:
            async with self._lock:
                await self._switch_locked(job)
        except asyncio.CancelledError:
            # Shutdown (aclose): the job still gets an outcome, so nobody waits on it forever.
            if not job.done:
                self._finish(job, JobStatus.FAILED, "switch cancelled")
            raise
        except Exception as exc:
            # A bug or an unforeseen error must not leave the job "running": that would refuse
            # every later switch with 409 until a restart. The lock is already released here.
            log.exception("switch_crashed", job=job.id, profile=job.profile_id)
            self._settle_after_crash(f"{type(exc).__name__}: {exc}")
            if not job.done:
                self._finish(job, JobStatus.FAILED, f"switch failed: {_reason(exc)}")

    async def _switch_locked(self, job: SwitchJob) -> None:
        previous = self._spec if self._state is EngineState.READY else None
        try:
            spec = self._spec_factory(job.profile_id)
            runtime = self._runtime_for(spec)
        except Exception as exc:
            # Any factory error (the gateway's raises ProfileNotFound, ProfileDoesNotFit, ...):
            # nothing was stopped yet, so the current engine keeps serving.
            self._finish(job, JobStatus.FAILED, f"cannot build engine: {_reason(exc)}")
            return
        await self._stop_locked()
        try:
            await self._start_locked(runtime, spec)
        except EngineNotStopped as exc:
            self._finish(job, JobStatus.FAILED, str(exc))
            return
        if self._is_ready():
            self._finish(job, JobStatus.SUCCEEDED, None)
            return
        job.logs = self.logs_tail(50) or job.logs
        reason = self._error or "engine failed to start"
        if previous is None:
            self._finish(job, JobStatus.FAILED, reason)
            return
        self._emit(f"rolling back to {previous.profile_id}: {reason}")
        await self._stop_locked()
        try:
            rollback = self._spec_factory(previous.profile_id)
            rollback_runtime = self._runtime_for(rollback)
        except Exception:
            # The profile may have changed or no longer fit; what ran before is the best bet.
            rollback, rollback_runtime = previous, self._runtime_for(previous)
        try:
            await self._start_locked(rollback_runtime, rollback)
        except EngineNotStopped as exc:
            self._finish(job, JobStatus.FAILED, f"{reason}; no rollback: {exc}")
            return
        if self._is_ready():
            self._finish(job, JobStatus.ROLLED_BACK, reason)
        else:
            self._finish(job, JobStatus.FAILED, f"{reason}; rollback failed: {self._error}")

    def _settle_after_crash(self, reason: str) -> None:
        """Leave a state from which the next start or switch can proceed (FAILED, not mid-step)."""
        if self._state in (EngineState.IDLE, EngineState.READY, EngineState.FAILED):
            return
        self._set_failure(Failure.ERROR, reason)
        self._enter(EngineState.FAILED, reason)

    def _is_ready(self) -> bool:
        # A method, not an inline check: the state changes across the awaits above.
        return self._state is EngineState.READY

    def _finish(self, job: SwitchJob, status: JobStatus, error: str | None) -> None:
        job.status, job.error, job.finished_at = status, error, time.time()
        self._emit(f"switch {status.value}" + (f": {error}" if error else ""), final=True)

    def _remember(self, job: SwitchJob) -> None:
        self._jobs[job.id] = job
        while len(self._jobs) > _MAX_JOBS_KEPT:
            oldest = next(iter(self._jobs))
            if self._jobs[oldest] is self._job:
                break
            del self._jobs[oldest]

    # -- steps (the lock is held) ------------------------------------------------------------

    def _runtime_for(self, spec: EngineSpec) -> Runtime:
        try:
            return self._runtimes[spec.runtime]
        except KeyError:
            known = ", ".join(sorted(self._runtimes))
            raise RuntimeError_(f"unknown runtime {spec.runtime!r} (known: {known})") from None

    async def _start_locked(
        self, runtime: Runtime, spec: EngineSpec, *, restart: bool = False
    ) -> None:
        """Start `spec` and wait until it serves. A `restart` (after a crash) keeps the crash's
        reason until it serves, and its failure counts as another crash."""
        if self._handle is not None:
            # FAILED still holding a handle: the last stop failed and that engine may still
            # run (and hold its GPUs). Starting now would overwrite the only handle to it.
            refused = self._not_stopped_reason()
            self._set_failure(Failure.NOT_STOPPED, refused)
            log.warning("engine_start_refused", profile=spec.profile_id, reason=refused)
            self._emit(refused)
            raise EngineNotStopped(refused)
        self._spec, self._served_names = spec, ()
        self._sleep_capable = self._asleep = False
        if not restart:
            self._set_failure(None, None)
            self._last_logs = ()
        self._enter(EngineState.STARTING, f"starting {spec.served_model_name} ({spec.runtime})")
        try:
            self._handle = await runtime.start(spec)
            self._enter(EngineState.LOADING, f"loading {spec.served_model_name}")
            await self._wait_serving(runtime, spec)
        except asyncio.CancelledError:
            await self._abort_start(runtime, "start cancelled")
            raise
        except (RuntimeError_, TimeoutError, httpx.HTTPError, OSError) as exc:
            await self._abort_start(runtime, str(exc) or type(exc).__name__, restart=restart)
            return
        except Exception as exc:
            # Anything else (a runtime bug, a library's own error type) still fails the start
            # cleanly: FAILED with the reason, so a switch can roll back.
            log.exception("engine_start_crashed", profile=spec.profile_id)
            await self._abort_start(runtime, f"{type(exc).__name__}: {exc}", restart=restart)
            return
        self._set_failure(None, None)
        self._enter(EngineState.READY, f"{spec.served_model_name} is ready")

    async def _wait_serving(self, runtime: Runtime, spec: EngineSpec) -> None:
        """Wait for /health 200 and /v1/models listing the served name."""
        assert self._handle is not None
        deadline = time.monotonic() + spec.startup_timeout_s
        interval = min(0.02, self._poll_interval_s)
        while True:
            if not await runtime.is_running(self._handle):
                raise RuntimeError_(f"engine exited during startup: {self._last_log_line()}")
            names, why_not = await self._served_names_if_healthy(spec)
            if names is not None:
                self._served_names = names
                # An engine with vLLM's sleep contract is watched for sleep from now on.
                asleep = await self._sleep_state(self._handle, spec, timeout_s=2.0)
                self._sleep_capable, self._asleep = asleep is not None, bool(asleep)
                return
            if time.monotonic() > deadline:
                # The last probe's reason goes with the error: "healthy but serves another
                # name" (a wrong --served-model-name) is fixed differently than "still loading".
                raise TimeoutError(
                    f"engine not serving after {spec.startup_timeout_s:g}s: {why_not}"
                )
            # Poll fast at first (small engines are up in well under a second), then back off.
            await asyncio.sleep(interval)
            interval = min(interval * 1.5, self._poll_interval_s)

    async def _served_names_if_healthy(
        self, spec: EngineSpec
    ) -> tuple[tuple[str, ...] | None, str]:
        """The served names once the engine serves the profile's name, else None and why not."""
        assert self._handle is not None
        try:
            health = await self._http.get(self._handle.base_url + spec.health_path, timeout=2.0)
            if health.status_code != 200:
                return None, f"{spec.health_path} returned {health.status_code}"
            models = await self._http.get(
                self._handle.base_url + "/v1/models", headers=_auth(spec), timeout=5.0
            )
            if models.status_code != 200:
                return None, f"/v1/models returned {models.status_code}"
            names = tuple(str(m["id"]) for m in models.json().get("data", []))
        except httpx.HTTPError as exc:
            return None, f"unreachable: {_reason(exc)}"
        except (ValueError, KeyError, TypeError) as exc:
            return None, f"unreadable /v1/models: {_reason(exc)}"
        # External engines are whatever they serve; ours must serve the profile's name.
        if spec.runtime == "external" or spec.served_model_name in names:
            return names, "serving"
        listed = ", ".join(names) or "no models"
        return None, f"/v1/models lists {listed}, not {spec.served_model_name}"

    def _not_stopped_reason(self) -> str:
        assert self._handle is not None
        handle = self._handle
        return (
            f"the previous engine ({self._profile_label()}, {handle.runtime} {handle.id}) could "
            f"not be confirmed stopped ({self._error or 'stop failed'}), and it may still hold "
            "its GPUs: no other engine is started until it is. Retry the stop (a new switch "
            "retries it first), or stop it by hand and then retry"
        )

    def _last_log_line(self) -> str:
        tail = self.logs_tail(5)
        return tail[-1] if tail else "no output"

    async def _abort_start(self, runtime: Runtime, reason: str, *, restart: bool = False) -> None:
        """A start failed: stop what it launched, then FAILED (or, for a restart, the crash
        policy decides: another restart or a crash loop)."""
        failure = Failure.START_FAILED
        if self._handle is not None:
            self._last_logs = tuple(self.logs_tail(50))
            log.warning("engine_start_failed", reason=reason, logs=self._last_logs[-20:])
            if self._job is not None and not self._job.done:
                self._job.logs = list(self._last_logs)
            try:
                await runtime.stop(self._handle)
            except Exception as exc:
                # Keep the handle: the engine may still run, and FAILED with a handle makes the
                # next stop or switch retry the stop before anything else starts.
                reason = f"{reason}; stop failed: {_reason(exc)}"
                failure, restart = Failure.NOT_STOPPED, False
            else:
                self._handle = None
        if restart:
            self._after_crash(f"the restart failed: {reason}")
            return
        self._set_failure(failure, reason)
        self._enter(EngineState.FAILED, reason)

    async def _stop_locked(self) -> None:
        if self._state is EngineState.IDLE:
            return
        stopping = "stopping engine"
        if self._state is EngineState.READY:
            self._enter(EngineState.DRAINING, f"draining {self._in_flight} in-flight request(s)")
            try:
                await asyncio.wait_for(self._idle.wait(), self._drain_timeout_s)
            except TimeoutError:
                # Bounded on purpose: a stuck client must not block a switch forever. The event
                # says so, since the requests still held are cut off by the stop.
                left = self._in_flight
                log.warning("engine_drain_timeout", in_flight=left, after_s=self._drain_timeout_s)
                stopping = (
                    f"drain timed out after {self._drain_timeout_s:g}s with {left} request(s) "
                    "in flight; stopping engine"
                )
        self._enter(EngineState.STOPPING, stopping)
        if self._handle is not None:
            runtime = self._runtimes[self._handle.runtime]
            try:
                await runtime.stop(self._handle)
            except Exception as exc:
                # Any error: FAILED keeps the handle, so the next stop or switch tries again.
                self._set_failure(Failure.NOT_STOPPED, f"stop failed: {_reason(exc)}")
                self._enter(EngineState.FAILED, f"stop failed: {_reason(exc)}")
                return
            self._handle = None
        self._served_names = ()
        self._sleep_capable = self._asleep = False
        self._restart_at = None
        self._set_failure(None, None)
        self._enter(EngineState.IDLE, "engine stopped")

    def _enter(self, state: EngineState, message: str) -> None:
        if state not in ALLOWED_TRANSITIONS[self._state]:
            raise InvalidTransition(f"{self._state.value} -> {state.value} is not allowed")
        self._state, self._since = state, time.time()
        log.info("engine_state", profile=self._profile_label(), state=state.value, message=message)
        self._emit(message)

    def _profile_label(self) -> str:
        return self._spec.profile_id if self._spec else "-"

    def _emit(self, message: str, *, final: bool = False) -> None:
        job = self._job if self._job is not None and (final or not self._job.done) else None
        event = EngineEvent(
            profile_id=self._profile_label(),
            state=self._state,
            message=message,
            job_id=job.id if job else None,
            progress=1.0 if final else _PROGRESS.get(self._state),
        )
        if job is not None:
            job.events.append(event)
        for queue in self._subscribers:
            with contextlib.suppress(asyncio.QueueFull):
                queue.put_nowait(event)


def _auth(spec: EngineSpec) -> dict[str, str] | None:
    """The header that carries the engine's API key (None for an engine without one)."""
    return {"Authorization": f"Bearer {spec.api_key}"} if spec.api_key else None


def _reason(exc: BaseException) -> str:
    """An exception as a job's error text (some, like a bare LookupError(), have no message)."""
    return str(exc) or type(exc).__name__
