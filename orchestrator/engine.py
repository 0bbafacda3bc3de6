"""ManagedEngine: one engine's life as one state machine (DESIGN.md, "States").

The fleet (`manager.py`) holds one ManagedEngine per profile it has run. Each has its own lock:
operations on different engines run concurrently, two operations on one engine never do. Every
state change goes through `_enter(new, message, expect=...)`, which names the state (or states)
it expects and refuses anything the transition table does not allow.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable, Collection, Mapping
from dataclasses import dataclass, field, replace
from enum import StrEnum

import httpx
import structlog

from orchestrator.recovery import PUBLIC_REASONS, CrashWindow, Failure, RestartPolicy
from orchestrator.runtimes.base import EngineSpec, Runtime, RuntimeError_, RuntimeHandle

log = structlog.get_logger(__name__)


class EngineState(StrEnum):
    """Where an engine is in its life."""

    IDLE = "idle"
    STARTING = "starting"
    LOADING = "loading"
    READY = "ready"
    DRAINING = "draining"
    STOPPING = "stopping"
    RESTARTING = "restarting"
    FAILED = "failed"
    # vLLM's sleep mode, driven by the fleet: drained, then asleep (the GPU memory freed but the
    # process kept), then woken.
    SLEEPING = "sleeping"
    ASLEEP = "asleep"
    WAKING = "waking"


# The only transitions an engine makes; anything else is a bug and raises.
ALLOWED_TRANSITIONS: Mapping[EngineState, frozenset[EngineState]] = {
    EngineState.IDLE: frozenset({EngineState.STARTING, EngineState.LOADING}),
    # STARTING/LOADING -> RESTARTING: a restart after a crash failed too; another one waits.
    EngineState.STARTING: frozenset(
        {EngineState.LOADING, EngineState.FAILED, EngineState.RESTARTING}
    ),
    EngineState.LOADING: frozenset({EngineState.READY, EngineState.FAILED, EngineState.RESTARTING}),
    # READY -> RESTARTING: the engine died while serving and the restart policy allows a restart;
    # READY -> FAILED: it died and is not restarted (restarts off, or a crash loop);
    # READY -> SLEEPING: the fleet parks it (drained first).
    EngineState.READY: frozenset(
        {
            EngineState.DRAINING,
            EngineState.FAILED,
            EngineState.RESTARTING,
            EngineState.SLEEPING,
        }
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
    # SLEEPING -> STOPPING: the sleep failed, so the engine is stopped cold instead (its memory
    # must be freed either way). SLEEPING -> FAILED: an unforeseen error mid-sleep.
    EngineState.SLEEPING: frozenset({EngineState.ASLEEP, EngineState.STOPPING, EngineState.FAILED}),
    # ASLEEP -> STOPPING: evicted for good, or it died while asleep (its remains are removed).
    EngineState.ASLEEP: frozenset({EngineState.WAKING, EngineState.STOPPING, EngineState.FAILED}),
    # WAKING -> STOPPING: the wake failed; the engine is stopped and the fleet starts it cold.
    EngineState.WAKING: frozenset({EngineState.READY, EngineState.STOPPING, EngineState.FAILED}),
}

# vLLM's sleep contract (served with VLLM_SERVER_DEV_MODE=1; the simulator always serves it):
# GET /is_sleeping -> {"is_sleeping": bool}. An engine that answers it is watched for sleep.
SLEEP_STATE_PATH = "/is_sleeping"
SLEEP_PATH = "/sleep"
WAKE_PATH = "/wake_up"
RPC_PATH = "/collective_rpc"
# vLLM offloads or discards the weights and frees the KV cache; tens of seconds for a big model.
SLEEP_TIMEOUT_S = 120.0
WAKE_TIMEOUT_S = 300.0

# States in which an engine holds memory (or may): it is resident in the fleet's ledger.
RESIDENT_STATES = frozenset(
    {
        EngineState.STARTING,
        EngineState.LOADING,
        EngineState.READY,
        EngineState.DRAINING,
        EngineState.STOPPING,
        EngineState.RESTARTING,
        EngineState.SLEEPING,
        EngineState.ASLEEP,
        EngineState.WAKING,
    }
)
# On the way to serving: requests for it wait rather than fail.
COMING_UP_STATES = frozenset(
    {EngineState.STARTING, EngineState.LOADING, EngineState.RESTARTING, EngineState.WAKING}
)


class InvalidTransition(Exception):
    """A state change that the state machine does not allow, or from a state not expected."""


class EngineBusy(Exception):
    """Another start, stop or switch is in progress."""

    def __init__(self, message: str, job_id: str | None = None) -> None:
        super().__init__(message)
        self.job_id = job_id


class EngineUnavailable(Exception):
    """No engine is ready to serve a request."""


class NodeLost(Exception):
    """A restart's engine cannot go back where it ran (its node left the cluster) and no
    remaining node has room for it; the message says what was tried."""


class EngineNotStopped(Exception):
    """The previous engine could not be confirmed stopped, so no other engine is started.

    Its process or container may still hold its GPUs; starting another one over it would lose
    its handle and leave it running with nobody to stop it. A stop that succeeds clears this.
    """


class JobStatus(StrEnum):
    """The outcome of a job."""

    PENDING = "pending"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    ROLLED_BACK = "rolled_back"
    FAILED = "failed"


class JobKind(StrEnum):
    """What a job does."""

    SWITCH = "switch"
    LOAD = "load"
    UNLOAD = "unload"
    SLEEP = "sleep"
    WAKE = "wake"


@dataclass(frozen=True)
class EngineEvent:
    """A progress event: a state change or a step inside a job."""

    profile_id: str
    state: EngineState
    message: str
    job_id: str | None = None
    progress: float | None = None
    at: float = field(default_factory=time.time)


@dataclass(frozen=True)
class EngineStatus:
    """A point-in-time view of one engine.

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
    # The engine does not serve because it sleeps: ASLEEP (the fleet parked it), or READY but
    # the engine says it is asleep (someone called its /sleep outside the gateway).
    asleep: bool = False
    # Crashes within the restart policy's window, and when the next restart begins (RESTARTING).
    recent_crashes: int = 0
    restart_at: float | None = None
    # The engine's last log lines when it last failed or crashed (admins only).
    logs: tuple[str, ...] = ()
    # The fleet: the level it sleeps at (0 awake), when it last served, how long its last cold
    # load and its last wake took.
    sleep_level: int = 0
    last_used: float | None = None
    last_load_s: float | None = None
    last_wake_s: float | None = None


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
    """A background job of the fleet: a switch, a load, an unload, a sleep or a wake."""

    id: str
    profile_id: str
    previous_profile_id: str | None
    kind: JobKind = JobKind.SWITCH
    exclusive: bool = False
    level: int | None = None  # a sleep's level (None: the profile's)
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


# Builds a fresh spec of this engine's profile (a restart gets a new port and key).
Respec = Callable[[], EngineSpec]
# Where events go: the fleet adds them to the job and hands them to its subscribers.
Publish = Callable[[EngineEvent], None]

# How often a starting engine is probed for readiness during its first seconds.
_FAST_POLL_S = 0.01
_FAST_POLL_FOR_S = 2.0

# Progress reported while an engine loads (STARTING and LOADING cover 0..1 of a switch).
_PROGRESS = {
    EngineState.DRAINING: 0.1,
    EngineState.STOPPING: 0.2,
    EngineState.IDLE: 0.3,
    EngineState.SLEEPING: 0.3,
    EngineState.STARTING: 0.4,
    EngineState.WAKING: 0.5,
    EngineState.LOADING: 0.5,
    EngineState.READY: 1.0,
}


@dataclass(frozen=True)
class EngineConfig:
    """What every engine of a fleet shares."""

    http: httpx.AsyncClient
    runtimes: Mapping[str, Runtime]
    drain_timeout_s: float = 30.0
    poll_interval_s: float = 0.25
    restart_policy: RestartPolicy = field(default_factory=RestartPolicy)
    # True while this gateway follows another replica (the leader): an engine found dead is
    # the leader's to restart, never this one's.
    following: Callable[[], bool] = lambda: False


class ManagedEngine:
    """One engine: starts, drains, stops, sleeps, wakes, restarts after a crash, adopts."""

    def __init__(
        self, profile_id: str, config: EngineConfig, *, respec: Respec, publish: Publish
    ) -> None:
        self.profile_id = profile_id
        self._config = config
        self._http = config.http
        self._runtimes = config.runtimes
        self._respec = respec
        self._publish = publish
        self.lock = asyncio.Lock()
        self.job: SwitchJob | None = None
        self._state = EngineState.IDLE
        self._since = time.time()
        self._spec: EngineSpec | None = None
        self._handle: RuntimeHandle | None = None
        self._served_names: tuple[str, ...] = ()
        self._error: str | None = None
        self._failure: Failure | None = None
        self._reason: str | None = None
        self._last_logs: tuple[str, ...] = ()
        # Sleep the engine reports on its own (GET /is_sleeping) while READY, and the level the
        # fleet put it to sleep at while ASLEEP.
        self._sleep_capable = False
        self._asleep = False
        self._sleep_level = 0
        self.last_used: float | None = None
        # When it last became ready (monotonic): a swap gives a model that just became ready
        # its turn before evicting it again (the scheduler's no-thrash bound).
        self.ready_since: float | None = None
        self.last_load_s: float | None = None
        self.last_wake_s: float | None = None
        self._crashes = CrashWindow(config.restart_policy)
        self._restart_at: float | None = None
        self._restart_task: asyncio.Task[None] | None = None
        self._restart_generation = 0
        self.restarts = 0
        self._in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()
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
    def served_names(self) -> tuple[str, ...]:
        """What the engine lists in /v1/models (empty until it serves)."""
        return self._served_names

    @property
    def serves(self) -> bool:
        """READY and awake: a request may take a slot now."""
        return self._state is EngineState.READY and self._handle is not None and not self._asleep

    @property
    def sleep_capable(self) -> bool:
        """Whether the engine answers vLLM's sleep contract (learned when it became ready)."""
        return self._sleep_capable

    @property
    def resident(self) -> bool:
        """Whether it holds (or may hold) memory: the ledger keeps its claim."""
        return self._state in RESIDENT_STATES or (
            self._state is EngineState.FAILED and self._handle is not None
        )

    def status(self) -> EngineStatus:
        """A snapshot (cheap: the proxy reads it for every request)."""
        external_sleep = self._asleep and self._state is EngineState.READY
        asleep = external_sleep or self._state is EngineState.ASLEEP
        return EngineStatus(
            profile_id=self._spec.profile_id if self._spec else None,
            served_model_name=self._spec.served_model_name if self._spec else None,
            served_names=self._served_names,
            state=self._state,
            base_url=self.base_url,
            since=self._since,
            in_flight=self._in_flight,
            error=self._error,
            failure=Failure.ASLEEP if external_sleep else self._failure,
            reason=self._public_reason(),
            asleep=asleep,
            recent_crashes=self._crashes.count(time.monotonic()),
            restart_at=self._restart_at if self._state is EngineState.RESTARTING else None,
            logs=self._last_logs,
            sleep_level=self._sleep_level if self._state is EngineState.ASLEEP else 0,
            last_used=self.last_used,
            last_load_s=self.last_load_s,
            last_wake_s=self.last_wake_s,
        )

    def _public_reason(self) -> str | None:
        """What users and the public are told about why the engine does not serve."""
        if self._asleep and self._state is EngineState.READY:
            return PUBLIC_REASONS[Failure.ASLEEP]
        if self._failure is None:
            return None
        return self._reason or PUBLIC_REASONS[self._failure]

    def set_failure(
        self, failure: Failure | None, detail: str | None, reason: str | None = None
    ) -> None:
        """Record why the engine does not serve: the code, the admin's detail, and (only when
        the gateway wrote it) a public reason other than the code's fixed sentence."""
        self._failure, self._error, self._reason = failure, detail, reason

    @property
    def error(self) -> str | None:
        """The admin's detail of the last failure."""
        return self._error

    def logs_tail(self, lines: int = 50) -> list[str]:
        """The engine's last log lines (empty for engines the gateway does not run)."""
        if self._handle is None:
            return []
        runtime = self._runtimes.get(self._handle.runtime)
        return runtime.logs_tail(self._handle, lines) if runtime else []

    # -- serving -----------------------------------------------------------------------------

    def acquire_slot(self) -> bool:
        """Count one in-flight request on the ready engine; False when it does not serve."""
        if not self.serves:
            return False
        self._in_flight += 1
        self._idle.clear()
        self.last_used = time.time()
        return True

    def release_slot(self) -> None:
        """Give back a slot taken with acquire_slot (a drain waits for these)."""
        self._in_flight -= 1
        self.last_used = time.time()
        if self._in_flight <= 0:
            self._in_flight = 0
            self._idle.set()

    @contextlib.asynccontextmanager
    async def serving(self) -> AsyncIterator[EngineStatus]:
        """Hold an in-flight slot on the ready engine; a drain waits for these."""
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
            response = await self._http.get(
                handle.base_url + spec.health_path, headers=auth_header(spec), timeout=timeout_s
            )
        except httpx.HTTPError as exc:
            detail = f"unreachable ({type(exc).__name__})"
            return EngineHealth(ok=False, state=self._state, detail=detail)
        latency = round((time.perf_counter() - started) * 1000, 2)
        if response.status_code != 200:
            detail = f"health returned {response.status_code}"
            return EngineHealth(ok=False, state=self._state, detail=detail, latency_ms=latency)
        if self._sleep_capable:
            asleep = await self.sleep_state(handle, spec, timeout_s)
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

    async def sleep_state(
        self, handle: RuntimeHandle, spec: EngineSpec, timeout_s: float
    ) -> bool | None:
        """The engine's GET /is_sleeping answer; None when it has no such route or did not
        answer (vLLM serves it only in its dev mode; other engines not at all)."""
        try:
            response = await self._http.get(
                handle.base_url + SLEEP_STATE_PATH, headers=auth_header(spec), timeout=timeout_s
            )
            if response.status_code != 200:
                return None
            value = response.json().get("is_sleeping")
        except (httpx.HTTPError, ValueError, AttributeError):
            return None
        return value if isinstance(value, bool) else None

    def _set_asleep(self, asleep: bool) -> None:
        """Follow what a READY engine says of its sleep; say so once when it changes."""
        if asleep == self._asleep:
            return
        self._asleep = asleep
        log.warning("engine_sleep", profile=self.profile_id, asleep=asleep)
        self.emit(
            "the engine is asleep: requests get 503 until it is woken up (POST /wake_up)"
            if asleep
            else "the engine woke up and serves again"
        )

    # -- lifecycle (each takes the engine's lock) ---------------------------------------------

    async def start(self, spec: EngineSpec) -> None:
        """Stop what runs, start `spec` and wait until it serves; FAILED with the reason.

        Raises EngineNotStopped, starting nothing, when the running engine cannot be stopped.
        """
        runtime = self.runtime_for(spec)
        async with self.lock:
            await self.stop_locked()
            await self.start_locked(runtime, spec)

    async def stop(self) -> None:
        """Drain and stop the engine if one runs (FAILED with the reason when the stop fails).

        Also the retry after a failed stop. A pending restart is cancelled (one in progress is
        cut short): stopped means stopped.
        """
        self.operator_acts()
        async with self.lock:
            await self.stop_locked()

    async def sleep(self, level: int) -> bool:
        """Drain and put the engine to sleep at `level`; a failed sleep stops it instead.
        True when it sleeps."""
        async with self.lock:
            return await self.sleep_locked(level)

    async def wake(self) -> bool:
        """Wake an engine the fleet put to sleep; a failed wake stops it (the caller starts it
        cold). True when it serves again."""
        async with self.lock:
            return await self.wake_locked()

    def mark_not_started(self, reason: str) -> None:
        """Record why no engine was started (e.g. the planner's verdict) while IDLE."""
        if self._state is EngineState.IDLE:
            # The gateway wrote this reason from the validated profiles and the GPU reading,
            # not from an engine's output: it is also what users and the public are told.
            self.set_failure(Failure.NOT_STARTED, reason, reason)

    async def adopt_locked(self, runtime: Runtime, handle: RuntimeHandle, spec: EngineSpec) -> bool:
        """Take over an engine of ours that already runs; True when it serves."""
        # The engine keeps the API key it was started with (the runtime read it back); the spec
        # just built carries a new one, which the engine would refuse.
        spec = replace(spec, api_key=handle.api_key)
        self._spec, self._handle = spec, handle
        self.set_failure(None, None)
        self._enter(
            EngineState.LOADING,
            f"adopting running {spec.served_model_name}",
            expect=EngineState.IDLE,
        )
        try:
            await self._wait_serving(runtime, spec)
        except (RuntimeError_, TimeoutError, httpx.HTTPError) as exc:
            await self._abort_start(runtime, f"adopted engine unhealthy: {exc}")
            await self.stop_locked()
            return False
        self._enter(
            EngineState.READY, f"adopted {spec.served_model_name}", expect=EngineState.LOADING
        )
        return True

    def start_watch(self, interval_s: float) -> None:
        """Notice an engine that died (crash, OOM kill) and restart it (or mark it FAILED, per
        the restart policy); follow whether a sleep-capable engine is asleep."""
        self._spawn(self._watch(interval_s), "engine-watchdog")

    def report_unreachable(self) -> None:
        """A request could not reach the engine: check at once whether it is still alive."""
        if self._state is EngineState.READY and not self.lock.locked():
            self._spawn(self.check_alive(), "engine-check")

    async def aclose(self) -> None:
        """Cancel this engine's tasks (the fleet stops the engine itself)."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _spawn(self, coro: object, name: str) -> None:
        task: asyncio.Task[None] = asyncio.create_task(coro, name=name)  # type: ignore[arg-type]
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _watch(self, interval_s: float) -> None:
        while True:
            await asyncio.sleep(interval_s)
            await self.check_alive()

    async def check_alive(self) -> None:
        """One look at the engine's process or container: restart (or fail) one that died while
        serving, remove one that died asleep, follow an engine's own report of its sleep."""
        handle, spec = self._handle, self._spec
        watched = (EngineState.READY, EngineState.ASLEEP)
        if self._state not in watched or handle is None or spec is None or self.lock.locked():
            return
        runtime = self._runtimes.get(handle.runtime)
        if runtime is None:
            return
        if await runtime.is_running(handle):
            if self._sleep_capable and self._state is EngineState.READY:
                asleep = await self.sleep_state(handle, spec, timeout_s=1.0)
                if asleep is not None and self._handle is handle and self._is_ready():
                    self._set_asleep(asleep)
            return
        # Re-check after the await: a job may have replaced the engine meanwhile.
        if self._handle is not handle or self.lock.locked():
            return
        self._last_logs = tuple(self.logs_tail(50))
        if self._state is EngineState.ASLEEP:
            # Parked engines are not restarted (a restart would claim its whole budget again):
            # its remains are removed and the next request loads it cold.
            log.warning("engine_died_asleep", profile=self.profile_id, logs=self._last_logs[-20:])
            async with self.lock:
                if self._handle is handle and self._state is EngineState.ASLEEP:
                    await self.stop_locked(reason="the engine exited while asleep")
            return
        if self._state is EngineState.READY:
            detail = f"engine exited while serving: {self._last_log_line()}"
            log.warning("engine_died", profile=self.profile_id, logs=self._last_logs[-20:])
            self._after_crash(detail)

    # -- restarts (DESIGN.md, "Restarts") -----------------------------------------------------

    def operator_acts(self) -> None:
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
        policy = self._config.restart_policy
        crashes = self._crashes.record(time.monotonic())
        expect = (EngineState.READY, EngineState.STARTING, EngineState.LOADING)
        if self._config.following():
            detail = f"{detail}; the leading gateway restarts it"
            self.set_failure(Failure.CRASHED, detail)
            self._enter(EngineState.FAILED, detail, expect=expect)
            return
        if not policy.enabled:
            self.set_failure(Failure.CRASHED, detail)
            self._enter(EngineState.FAILED, detail, expect=expect)
            return
        if self._crashes.is_loop(crashes):
            detail = (
                f"crash loop: the engine crashed {crashes} times within {policy.window_s:g}s "
                f"(at most {policy.max_restarts} restarts), so it is not restarted again; "
                f"last crash: {detail}. Switch to it again once the cause is fixed"
            )
            log.error("engine_crash_loop", profile=self.profile_id, crashes=crashes)
            self.set_failure(Failure.CRASH_LOOP, detail)
            self._enter(EngineState.FAILED, detail, expect=expect)
            return
        delay = policy.delay_s(crashes)
        self.set_failure(Failure.RESTARTING, detail)
        self._restart_at = time.time() + delay
        self._enter(
            EngineState.RESTARTING,
            f"{detail}; restart {crashes} of at most {policy.max_restarts} "
            f"within {policy.window_s:g}s in {delay:g}s",
            expect=expect,
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
        async with self.lock:
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
                    f"the crashed engine ({self.profile_id}, {handle.runtime} {handle.id}) "
                    f"could not be cleaned up (stop failed: {_reason(exc)}), so it is not "
                    "restarted. Retry the stop (a new switch retries it first)"
                )
                self.set_failure(Failure.NOT_STOPPED, detail)
                self._enter(EngineState.FAILED, detail, expect=EngineState.RESTARTING)
                return
            self._handle = None
        try:
            # A fresh spec: a new port and API key, planned against the GPUs as they are now.
            spec = self._respec()
            runtime = self.runtime_for(spec)
        except NodeLost as exc:
            log.error("engine_node_lost", profile=self.profile_id, reason=str(exc))
            self._restart_at = None
            self.set_failure(Failure.NODE_LOST, str(exc))
            self._enter(EngineState.FAILED, str(exc), expect=EngineState.RESTARTING)
            return
        except Exception as exc:
            # The profile changed or no longer fits: what ran before is the best bet.
            log.warning("engine_restart_respec_failed", profile=self.profile_id, error=str(exc))
            spec, runtime = previous, self.runtime_for(previous)
        self._restart_at = None
        self.restarts += 1
        await self.start_locked(runtime, spec, restart=True)

    # -- steps (the lock is held) ------------------------------------------------------------

    def runtime_for(self, spec: EngineSpec) -> Runtime:
        """The runtime that runs `spec`."""
        try:
            return self._runtimes[spec.runtime]
        except KeyError:
            known = ", ".join(sorted(self._runtimes))
            raise RuntimeError_(f"unknown runtime {spec.runtime!r} (known: {known})") from None

    async def start_locked(
        self, runtime: Runtime, spec: EngineSpec, *, restart: bool = False
    ) -> None:
        """Start `spec` and wait until it serves. A `restart` (after a crash) keeps the crash's
        reason until it serves, and its failure counts as another crash."""
        if self._handle is not None:
            # FAILED still holding a handle: the last stop failed and that engine may still
            # run (and hold its GPUs). Starting now would overwrite the only handle to it.
            refused = self.not_stopped_reason()
            self.set_failure(Failure.NOT_STOPPED, refused)
            log.warning("engine_start_refused", profile=spec.profile_id, reason=refused)
            self.emit(refused)
            raise EngineNotStopped(refused)
        self._spec, self._served_names = spec, ()
        self._sleep_capable = self._asleep = False
        self._sleep_level = 0
        if not restart:
            self.set_failure(None, None)
            self._last_logs = ()
        started = time.monotonic()
        self._enter(
            EngineState.STARTING,
            f"starting {spec.served_model_name} ({spec.runtime})",
            expect=(EngineState.IDLE, EngineState.FAILED, EngineState.RESTARTING),
        )
        try:
            self._handle = await runtime.start(spec)
            self._enter(
                EngineState.LOADING,
                f"loading {spec.served_model_name}",
                expect=EngineState.STARTING,
            )
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
        self.set_failure(None, None)
        self.last_load_s = time.monotonic() - started
        self.last_used = time.time()
        self._enter(
            EngineState.READY, f"{spec.served_model_name} is ready", expect=EngineState.LOADING
        )

    async def _wait_serving(self, runtime: Runtime, spec: EngineSpec) -> None:
        """Wait for /health 200 and /v1/models listing the served name."""
        assert self._handle is not None
        started = time.monotonic()
        deadline = started + spec.startup_timeout_s
        interval = min(_FAST_POLL_S, self._config.poll_interval_s)
        while True:
            if not await runtime.is_running(self._handle):
                raise RuntimeError_(f"engine exited during startup: {self._last_log_line()}")
            names, why_not = await self._served_names_if_healthy(spec)
            if names is not None:
                self._served_names = names
                # An engine with vLLM's sleep contract is watched for sleep from now on.
                asleep = await self.sleep_state(self._handle, spec, timeout_s=2.0)
                self._sleep_capable, self._asleep = asleep is not None, bool(asleep)
                return
            if time.monotonic() > deadline:
                # The last probe's reason goes with the error: "healthy but serves another
                # name" (a wrong --served-model-name) is fixed differently than "still loading".
                raise TimeoutError(
                    f"engine not serving after {spec.startup_timeout_s:g}s: {why_not}"
                )
            # Poll fast at first (small engines are up in well under a second: a growing
            # interval would add up to half of its last step to each of their starts), then
            # back off to poll_interval_s (a real model loads for tens of seconds).
            await asyncio.sleep(interval)
            if time.monotonic() - started > _FAST_POLL_FOR_S:
                interval = min(interval * 1.5, self._config.poll_interval_s)

    async def _served_names_if_healthy(
        self, spec: EngineSpec
    ) -> tuple[tuple[str, ...] | None, str]:
        """The served names once the engine serves the profile's name, else None and why not."""
        assert self._handle is not None
        try:
            health = await self._http.get(
                self._handle.base_url + spec.health_path, headers=auth_header(spec), timeout=2.0
            )
            if health.status_code != 200:
                return None, f"{spec.health_path} returned {health.status_code}"
            models = await self._http.get(
                self._handle.base_url + "/v1/models", headers=auth_header(spec), timeout=5.0
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

    def not_stopped_reason(self) -> str:
        """Why nothing may start over this engine (its handle is held after a failed stop)."""
        assert self._handle is not None
        handle = self._handle
        return (
            f"the previous engine ({self.profile_id}, {handle.runtime} {handle.id}) could "
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
            if self.job is not None and not self.job.done:
                self.job.logs = list(self._last_logs)
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
        self.set_failure(failure, reason)
        self._enter(EngineState.FAILED, reason, expect=(EngineState.STARTING, EngineState.LOADING))

    async def _drain(self, what: str) -> str:
        """Wait (bounded by the drain timeout) for the in-flight requests; what to say next."""
        try:
            await asyncio.wait_for(self._idle.wait(), self._config.drain_timeout_s)
        except TimeoutError:
            # Bounded on purpose: a stuck client must not block a switch forever. The event
            # says so, since the requests still held are cut off.
            left = self._in_flight
            timeout = self._config.drain_timeout_s
            log.warning("engine_drain_timeout", in_flight=left, after_s=timeout)
            return f"drain timed out after {timeout:g}s with {left} request(s) in flight; {what}"
        return what

    async def stop_locked(self, *, reason: str = "stopping engine") -> None:
        """Drain (when READY) and stop; IDLE, or FAILED keeping the handle when the stop fails."""
        if self._state is EngineState.IDLE:
            return
        stopping = reason
        if self._state is EngineState.READY:
            self._enter(
                EngineState.DRAINING,
                f"draining {self._in_flight} in-flight request(s)",
                expect=EngineState.READY,
            )
            stopping = await self._drain(reason)
        self._enter(
            EngineState.STOPPING,
            stopping,
            expect=(
                EngineState.DRAINING,
                EngineState.RESTARTING,
                EngineState.FAILED,
                EngineState.ASLEEP,
                EngineState.SLEEPING,
                EngineState.WAKING,
            ),
        )
        await self._remove("stop failed")

    async def _remove(self, failed: str) -> None:
        """STOPPING: stop the runtime's engine; IDLE, or FAILED keeping the handle."""
        if self._handle is not None:
            runtime = self._runtimes[self._handle.runtime]
            try:
                await runtime.stop(self._handle)
            except Exception as exc:
                # Any error: FAILED keeps the handle, so the next stop or switch tries again.
                self.set_failure(Failure.NOT_STOPPED, f"{failed}: {_reason(exc)}")
                self._enter(
                    EngineState.FAILED, f"{failed}: {_reason(exc)}", expect=EngineState.STOPPING
                )
                return
            self._handle = None
        self._served_names = ()
        self._sleep_capable = self._asleep = False
        self._sleep_level = 0
        self._restart_at = None
        self.set_failure(None, None)
        self._enter(EngineState.IDLE, "engine stopped", expect=EngineState.STOPPING)

    async def sleep_locked(self, level: int) -> bool:
        """READY -> SLEEPING (drain, POST /sleep?level=N) -> ASLEEP; a failed sleep stops the
        engine cold (SLEEPING -> STOPPING -> IDLE). vLLM aborts what runs when it is put to
        sleep, so the engine is drained first (new requests are not admitted meanwhile)."""
        handle, spec = self._handle, self._spec
        if handle is None or spec is None:
            raise InvalidTransition(f"{self.profile_id} has no engine to put to sleep")
        started = time.monotonic()
        self._enter(
            EngineState.SLEEPING,
            f"draining {self._in_flight} in-flight request(s), then sleeping at level {level}",
            expect=EngineState.READY,
        )
        await self._drain("sleeping")
        try:
            response = await self._http.post(
                handle.base_url + SLEEP_PATH,
                params={"level": str(level)},
                headers=auth_header(spec),
                timeout=SLEEP_TIMEOUT_S,
            )
            if response.status_code != 200:
                raise RuntimeError_(f"POST /sleep returned {response.status_code}")
            asleep = await self.sleep_state(handle, spec, timeout_s=5.0)
            if asleep is not True:
                raise RuntimeError_("the engine does not report that it sleeps")
        except (httpx.HTTPError, RuntimeError_) as exc:
            why = f"sleep failed ({_reason(exc)}): stopping the engine instead"
            log.warning("engine_sleep_failed", profile=self.profile_id, reason=_reason(exc))
            self._enter(EngineState.STOPPING, why, expect=EngineState.SLEEPING)
            await self._remove("stop after a failed sleep failed")
            return False
        self._sleep_level = level
        self._enter(
            EngineState.ASLEEP,
            f"asleep at level {level} after {time.monotonic() - started:.1f}s",
            expect=EngineState.SLEEPING,
        )
        return True

    async def wake_locked(self) -> bool:
        """ASLEEP -> WAKING -> READY. Level 1: POST /wake_up. Level 2 as vLLM documents it:
        wake the weights' memory, reload the weights, then wake the KV cache. A failed wake
        stops the engine (WAKING -> STOPPING -> IDLE) so the fleet can start it cold."""
        handle, spec = self._handle, self._spec
        if handle is None or spec is None:
            raise InvalidTransition(f"{self.profile_id} has no engine to wake")
        level = self._sleep_level
        started = time.monotonic()
        self._enter(EngineState.WAKING, f"waking from level {level}", expect=EngineState.ASLEEP)
        headers = auth_header(spec)
        try:
            if level == 2:
                await self._post(handle, WAKE_PATH, headers, params={"tags": "weights"})
                await self._post(handle, RPC_PATH, headers, json={"method": "reload_weights"})
                await self._post(handle, WAKE_PATH, headers, params={"tags": "kv_cache"})
            else:
                await self._post(handle, WAKE_PATH, headers)
            asleep = await self.sleep_state(handle, spec, timeout_s=5.0)
            if asleep is not False:
                raise RuntimeError_("the engine still reports that it sleeps")
        except (httpx.HTTPError, RuntimeError_) as exc:
            why = f"wake failed ({_reason(exc)}): stopping the engine to start it cold"
            log.warning("engine_wake_failed", profile=self.profile_id, reason=_reason(exc))
            self._enter(EngineState.STOPPING, why, expect=EngineState.WAKING)
            await self._remove("stop after a failed wake failed")
            return False
        self._sleep_level = 0
        self.last_wake_s = time.monotonic() - started
        self.last_used = time.time()
        self._enter(
            EngineState.READY,
            f"{spec.served_model_name} woke in {self.last_wake_s:.1f}s",
            expect=EngineState.WAKING,
        )
        return True

    async def _post(
        self,
        handle: RuntimeHandle,
        path: str,
        headers: dict[str, str] | None,
        *,
        params: dict[str, str] | None = None,
        json: dict[str, str] | None = None,
    ) -> None:
        response = await self._http.post(
            handle.base_url + path,
            params=params,
            json=json,
            headers=headers,
            timeout=WAKE_TIMEOUT_S,
        )
        if response.status_code != 200:
            raise RuntimeError_(f"POST {path} returned {response.status_code}")

    def settle_after_crash(self, reason: str) -> None:
        """Leave a state from which the next start can proceed (FAILED, not mid-step)."""
        if self._state in (
            EngineState.IDLE,
            EngineState.READY,
            EngineState.FAILED,
            EngineState.ASLEEP,
        ):
            return
        self.set_failure(Failure.ERROR, reason)
        self._enter(EngineState.FAILED, reason, expect=self._state)

    def _is_ready(self) -> bool:
        # A method, not an inline check: the state changes across awaits.
        return self._state is EngineState.READY

    def _enter(
        self,
        state: EngineState,
        message: str,
        *,
        expect: EngineState | Collection[EngineState],
    ) -> None:
        """The only writer of the state: from `expect` (compare-and-set) along the table."""
        expected = (expect,) if isinstance(expect, EngineState) else expect
        if self._state not in expected:
            names = ", ".join(s.value for s in expected)
            raise InvalidTransition(
                f"{self.profile_id}: expected {names} for -> {state.value}, "
                f"found {self._state.value}"
            )
        if state not in ALLOWED_TRANSITIONS[self._state]:
            raise InvalidTransition(f"{self._state.value} -> {state.value} is not allowed")
        self._state, self._since = state, time.time()
        if state is EngineState.READY:
            self.ready_since = time.monotonic()
        log.info("engine_state", profile=self.profile_id, state=state.value, message=message)
        self.emit(message)

    def emit(self, message: str, *, final: bool = False) -> None:
        """Publish an event (with the job acting on this engine, if any)."""
        job = self.job if self.job is not None and (final or not self.job.done) else None
        event = EngineEvent(
            profile_id=self.profile_id,
            state=self._state,
            message=message,
            job_id=job.id if job else None,
            progress=1.0 if final else _PROGRESS.get(self._state),
        )
        if job is not None:
            job.events.append(event)
        self._publish(event)


def auth_header(spec: EngineSpec) -> dict[str, str] | None:
    """The header that carries the engine's API key (None for an engine without one)."""
    return {"Authorization": f"Bearer {spec.api_key}"} if spec.api_key else None


def _reason(exc: BaseException) -> str:
    """An exception as a job's error text (some, like a bare LookupError(), have no message)."""
    return str(exc) or type(exc).__name__


def reason_of(exc: BaseException) -> str:
    """An exception as a job's error text."""
    return _reason(exc)
