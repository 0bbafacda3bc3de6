"""VLLMModelManager: the one state machine of an engine's life (see DESIGN.md)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from enum import StrEnum

import httpx
import structlog

from orchestrator.runtimes.base import EngineSpec, Runtime, RuntimeError_, RuntimeHandle

log = structlog.get_logger(__name__)


class EngineState(StrEnum):
    """Where an engine is in its life."""

    STOPPED = "stopped"
    STARTING = "starting"
    READY = "ready"
    STOPPING = "stopping"
    FAILED = "failed"


# The only transitions the manager makes; anything else is a bug and raises.
ALLOWED_TRANSITIONS: Mapping[EngineState, frozenset[EngineState]] = {
    EngineState.STOPPED: frozenset({EngineState.STARTING}),
    EngineState.STARTING: frozenset({EngineState.READY, EngineState.FAILED, EngineState.STOPPING}),
    EngineState.READY: frozenset({EngineState.STOPPING, EngineState.FAILED}),
    EngineState.STOPPING: frozenset({EngineState.STOPPED, EngineState.FAILED}),
    EngineState.FAILED: frozenset({EngineState.STARTING, EngineState.STOPPING}),
}


class InvalidTransition(Exception):
    """A state change that the state machine does not allow."""


class EngineBusy(Exception):
    """Another start/stop is in progress."""


@dataclass(frozen=True)
class EngineEvent:
    """A progress event: a state change or a step inside one."""

    profile_id: str
    state: EngineState
    message: str
    at: float = field(default_factory=time.time)


@dataclass(frozen=True)
class EngineStatus:
    """A point-in-time view of the managed engine."""

    profile_id: str | None
    served_model_name: str | None
    state: EngineState
    base_url: str | None
    since: float
    error: str | None = None


@dataclass(frozen=True)
class EngineHealth:
    """The outcome of one health probe."""

    ok: bool
    state: EngineState
    detail: str
    latency_ms: float | None = None


class VLLMModelManager:
    """Owns the engine: starts, stops, probes; every state change goes through `_enter`."""

    def __init__(
        self,
        *,
        http: httpx.AsyncClient,
        runtimes: Mapping[str, Runtime],
        poll_interval_s: float = 0.25,
    ) -> None:
        self._http = http
        self._runtimes = dict(runtimes)
        self._poll_interval_s = poll_interval_s
        self._lock = asyncio.Lock()
        self._state = EngineState.STOPPED
        self._since = time.time()
        self._spec: EngineSpec | None = None
        self._handle: RuntimeHandle | None = None
        self._error: str | None = None
        self._subscribers: set[asyncio.Queue[EngineEvent]] = set()

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

    def status(self) -> EngineStatus:
        """A snapshot of what is running."""
        return EngineStatus(
            profile_id=self._spec.profile_id if self._spec else None,
            served_model_name=self._spec.served_model_name if self._spec else None,
            state=self._state,
            base_url=self.base_url,
            since=self._since,
            error=self._error,
        )

    def logs_tail(self, lines: int = 50) -> list[str]:
        """The engine's last log lines (empty for engines the gateway does not run)."""
        if self._handle is None or self._spec is None:
            return []
        return self._runtimes[self._spec.runtime].logs_tail(self._handle, lines)

    async def subscribe(self) -> AsyncIterator[EngineEvent]:
        """Yield progress events until the consumer stops iterating."""
        queue: asyncio.Queue[EngineEvent] = asyncio.Queue(maxsize=256)
        self._subscribers.add(queue)
        try:
            while True:
                yield await queue.get()
        finally:
            self._subscribers.discard(queue)

    async def start(self, spec: EngineSpec) -> EngineStatus:
        """Start `spec` and wait until it is healthy; FAILED (with the reason) otherwise."""
        if self._lock.locked():
            raise EngineBusy("an engine start or stop is already in progress")
        async with self._lock:
            if self._state in (EngineState.READY, EngineState.FAILED):
                await self._stop_locked()
            runtime = self._runtime_for(spec)
            self._spec, self._error = spec, None
            self._enter(EngineState.STARTING, f"starting {spec.served_model_name} ({spec.runtime})")
            try:
                self._handle = await runtime.start(spec)
                await self._wait_healthy(runtime, spec)
            except asyncio.CancelledError:
                await self._abort_start(runtime, "start cancelled")
                raise
            except (RuntimeError_, TimeoutError, httpx.HTTPError) as exc:
                await self._abort_start(runtime, str(exc) or type(exc).__name__)
                return self.status()
            self._enter(EngineState.READY, f"{spec.served_model_name} is ready")
            return self.status()

    async def stop(self) -> EngineStatus:
        """Stop the engine if one runs."""
        async with self._lock:
            await self._stop_locked()
            return self.status()

    async def probe(self, timeout_s: float = 2.0) -> EngineHealth:
        """One health request to the engine (used by /health/ready)."""
        if self._state is not EngineState.READY or self._handle is None or self._spec is None:
            detail = self._error or f"engine is {self._state.value}"
            return EngineHealth(ok=False, state=self._state, detail=detail)
        started = time.perf_counter()
        try:
            response = await self._http.get(
                self._handle.base_url + self._spec.health_path, timeout=timeout_s
            )
        except httpx.HTTPError as exc:
            return EngineHealth(ok=False, state=self._state, detail=f"unreachable: {exc!r}")
        latency = round((time.perf_counter() - started) * 1000, 2)
        if response.status_code != 200:
            detail = f"health returned {response.status_code}"
            return EngineHealth(ok=False, state=self._state, detail=detail, latency_ms=latency)
        return EngineHealth(ok=True, state=self._state, detail="healthy", latency_ms=latency)

    async def aclose(self) -> None:
        """Stop the engine on shutdown."""
        with contextlib.suppress(InvalidTransition):
            await self.stop()

    def _runtime_for(self, spec: EngineSpec) -> Runtime:
        try:
            return self._runtimes[spec.runtime]
        except KeyError:
            known = ", ".join(sorted(self._runtimes))
            raise RuntimeError_(f"unknown runtime {spec.runtime!r} (known: {known})") from None

    async def _wait_healthy(self, runtime: Runtime, spec: EngineSpec) -> None:
        assert self._handle is not None
        deadline = time.monotonic() + spec.startup_timeout_s
        url = self._handle.base_url + spec.health_path
        while True:
            if not await runtime.is_running(self._handle):
                raise RuntimeError_(f"engine exited during startup: {self._last_log_line()}")
            with contextlib.suppress(httpx.HTTPError):
                response = await self._http.get(url, timeout=2.0)
                if response.status_code == 200:
                    return
            if time.monotonic() > deadline:
                raise TimeoutError(f"engine not healthy after {spec.startup_timeout_s:.0f}s")
            await asyncio.sleep(self._poll_interval_s)

    def _last_log_line(self) -> str:
        tail = self.logs_tail(5)
        return tail[-1] if tail else "no output"

    async def _abort_start(self, runtime: Runtime, reason: str) -> None:
        self._error = reason
        if self._handle is not None:
            log.warning("engine_start_failed", reason=reason, logs=self.logs_tail(20))
            with contextlib.suppress(RuntimeError_, OSError):
                await runtime.stop(self._handle)
            self._handle = None
        self._enter(EngineState.FAILED, reason)

    async def _stop_locked(self) -> None:
        if self._state is EngineState.STOPPED:
            return
        self._enter(EngineState.STOPPING, "stopping engine")
        if self._handle is not None and self._spec is not None:
            runtime = self._runtimes[self._spec.runtime]
            try:
                await runtime.stop(self._handle)
            except (RuntimeError_, OSError) as exc:
                self._error = f"stop failed: {exc}"
                self._enter(EngineState.FAILED, self._error)
                return
            self._handle = None
        self._enter(EngineState.STOPPED, "engine stopped")

    def _enter(self, state: EngineState, message: str) -> None:
        if state not in ALLOWED_TRANSITIONS[self._state]:
            raise InvalidTransition(f"{self._state.value} -> {state.value} is not allowed")
        self._state, self._since = state, time.time()
        profile = self._spec.profile_id if self._spec else "-"
        log.info("engine_state", profile=profile, state=state.value, message=message)
        event = EngineEvent(profile_id=profile, state=state, message=message)
        for queue in self._subscribers:
            with contextlib.suppress(asyncio.QueueFull):
                queue.put_nowait(event)
