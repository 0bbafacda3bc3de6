"""Admission: which upstream serves a request, and when.

Local first, up to `max_local` concurrent requests (seed: max_queue_size). With a cloud upstream
configured, a request overflows to it when local is down or switching, and when local is
saturated: at once without OVERFLOW_SLO_S; with it, only when the request's predicted wait for a
local slot exceeds the SLO or it has waited the SLO (`_overflows`). Without a cloud upstream it
waits in a bounded queue for a bounded time.
Requests for a model that is loading (or restarting after a crash) wait for it; an engine that
is asleep is refused at once (503). With AUTO_SWITCH a request for a model that is
not loaded starts the switch, and waiters for the loaded model are served first (no thrash).
"""

from __future__ import annotations

import asyncio
import math
import time
from dataclasses import dataclass, field

from gateway.engine import EXTERNAL_PROFILE, ModelControl, ProfileDoesNotFit, ProfileNotFound
from gateway.errors import GatewayError
from gateway.proxy.metrics import ModelNames, ProxyMetrics
from gateway.proxy.upstream import Target
from orchestrator.manager import EngineBusy, EngineState, EngineStatus

CURRENT = "current"
_RETRY_AFTER = {"Retry-After": "5"}
# The waiters' key of requests for "current" (no profile id has angle brackets).
_CURRENT_KEY = "<current>"
# How every key of this gateway starts (API_KEY_PREFIX must match ^sk-, and so do generated
# admin keys), and most providers' keys: a model name like this is never shown, even a known one.
KEY_LIKE_PREFIX = "sk-"


@dataclass(frozen=True)
class CloudUpstream:
    """An OpenAI-compatible cloud endpoint for overflow."""

    api_base: str
    api_key: str
    default_model: str
    model_map: dict[str, str] = field(default_factory=dict)

    def model_for(self, local_model: str | None) -> str:
        """The cloud model standing in for a local one; a mapped cloud model is kept as named."""
        if local_model and local_model in self.model_map:
            return self.model_map[local_model]
        if local_model and local_model in self.model_map.values():
            return local_model
        return self.default_model


@dataclass(frozen=True)
class SchedulerConfig:
    """Load-balancing settings."""

    max_local: int
    max_waiting: int
    queue_timeout_s: float
    overflow_slo_s: float | None
    auto_switch: bool
    cloud: CloudUpstream | None
    enabled: bool = True
    # Model names starting like one of these are never logged or echoed (see shown_model):
    # API_KEY_PREFIX and the start of ADMIN_API_KEY, besides KEY_LIKE_PREFIX.
    secret_prefixes: tuple[str, ...] = ()


@dataclass
class Lease:
    """Permission to send one request to one upstream; released exactly once."""

    target: Target
    scheduler: Scheduler
    started: float = field(default_factory=time.monotonic)
    released: bool = False

    def release(self) -> None:
        """Return the slot (idempotent)."""
        if not self.released:
            self.released = True
            self.scheduler.release(self)


@dataclass(frozen=True)
class _Wait:
    reason: str


class Scheduler:
    """Decides local, cloud or wait for each request; counts what it admitted."""

    def __init__(self, control: ModelControl, config: SchedulerConfig) -> None:
        self._control = control
        self.config = config
        self.cloud_in_flight = 0
        self.overflow_count = 0
        # Waiters per wanted profile id (None: none, a cloud model; _CURRENT_KEY: "current").
        self._waiting: dict[str | None, int] = {}
        self._changed = asyncio.Event()
        self._service_time_s = 1.0  # moving average of a local request's duration
        self._follower: asyncio.Task[None] | None = None
        cloud_names = (
            frozenset({config.cloud.default_model, *config.cloud.model_map.values()})
            if config.cloud
            else frozenset()
        )
        self.metrics = ProxyMetrics(ModelNames(control, cloud_names), max_local=config.max_local)

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        """Wake waiters on every engine state change."""
        self._follower = asyncio.create_task(self._follow(), name="scheduler-follow")

    async def aclose(self) -> None:
        """Stop following the manager."""
        if self._follower is not None:
            self._follower.cancel()
            await asyncio.gather(self._follower, return_exceptions=True)

    async def _follow(self) -> None:
        async for _ in self._control.manager.subscribe():
            self._notify()

    def _notify(self) -> None:
        event, self._changed = self._changed, asyncio.Event()
        event.set()

    # -- views -------------------------------------------------------------------------------

    @property
    def local_in_flight(self) -> int:
        """Requests running on the local engine (the manager's slots; a switch drains them)."""
        return self._control.manager.in_flight

    @property
    def queue_depth(self) -> int:
        """Requests waiting for a slot or a model."""
        return sum(self._waiting.values())

    def predicted_wait_s(self, ahead: int | None = None) -> float:
        """Predicted wait for a local slot of a request with `ahead` requests queued before it
        (default: all that wait now, i.e. the next request to arrive).

        0 while a slot is free; else it needs ahead + 1 slots to free up, and the busy slots
        free one every mean service time / slots: (ahead + 1) * mean service time / slots.
        """
        if self.local_in_flight < self.config.max_local:
            return 0.0
        if ahead is None:
            ahead = self.queue_depth
        return (ahead + 1) * self._service_time_s / max(self.config.max_local, 1)

    # -- model names in logs and errors ------------------------------------------------------

    def shown_model(self, name: str | None) -> str | None:
        """`name` as a log line may show it: itself when it names a known model (a profile's
        served name or alias, a cloud model, a name the running engine lists, or "current")
        and does not start like a key; otherwise only its length. Whatever a client puts in
        `model` (a pasted API key, say) never reaches the logs or an error message."""
        if name is None:
            return None
        if name == CURRENT or (
            not name.startswith((KEY_LIKE_PREFIX, *self.config.secret_prefixes))
            and self.metrics.names.is_known(name)
        ):
            return name
        return f"<unknown model name of {len(name)} characters>"

    def quoted_model(self, name: str | None) -> str:
        """`name` for an error message: quoted when it may be shown (`shown_model`)."""
        shown = self.shown_model(name or CURRENT)
        return f"'{shown}'" if shown == (name or CURRENT) else str(shown)

    def check_model(self, model: str | None) -> None:
        """404 (`model_not_found`) when `model` names nothing here; a check that decides
        nothing else, for callers that must refuse before they save anything."""
        self._wanted_profile(model, self._control.manager.status())

    # -- admission ---------------------------------------------------------------------------

    async def acquire(self, model: str | None) -> Lease:
        """Wait (bounded) until the request may go to the local engine or the cloud."""
        if self.queue_depth >= self.config.max_waiting:
            # A full queue refuses only requests that would wait: one that can go now (a free
            # local slot, or the cloud) still goes. QUEUE_MAX_WAITING=0 means no queue. It
            # cannot wait, so its SLO counts as spent: a full local overflows if it can.
            decision = self._decide(model, waited_s=math.inf)
            if isinstance(decision, Lease):
                self.metrics.admitted_now()
                return decision
            self.metrics.queue_full()
            raise GatewayError(
                503,
                f"The queue is full ({self.config.max_waiting} waiting); retry shortly.",
                code="queue_full",
                headers=_RETRY_AFTER,
            )
        # Waiters count per profile, so a request under an alias counts for its model (the
        # no-thrash check in _not_loaded); resolved once, here, off the fast path. "current"
        # stays apart: it means whatever is loaded when it is served, not at arrival.
        key = (
            _CURRENT_KEY
            if model is None or model == CURRENT
            else self._wanted_profile(model, self._control.manager.status())
        )
        self._waiting[key] = self._waiting.get(key, 0) + 1
        self.metrics.queue_entered()
        started = time.monotonic()
        deadline = started + self.config.queue_timeout_s
        slo = self.config.overflow_slo_s if self.config.cloud and self.config.enabled else None
        outcome = "cancelled"
        # The first decision is the arrival's (its predicted wait, with the others queued
        # ahead of it); later ones are a queued request's (the time it has waited).
        arriving = True
        try:
            while True:
                changed = self._changed
                now = time.monotonic()
                waited_s = None if arriving else now - started
                arriving = False
                decision = self._decide(model, ahead=self.queue_depth - 1, waited_s=waited_s)
                if isinstance(decision, Lease):
                    outcome = "admitted"
                    return decision
                remaining = deadline - now
                if remaining <= 0:
                    outcome = "timeout"
                    raise GatewayError(
                        503,
                        f"Waited {self.config.queue_timeout_s:g}s: {decision.reason}.",
                        code="engine_busy",
                        headers=_RETRY_AFTER,
                    )
                if slo is not None and now - started < slo:
                    # Wake when the SLO is spent, to overflow if no slot freed meanwhile.
                    remaining = min(remaining, started + slo - now)
                try:
                    await asyncio.wait_for(changed.wait(), remaining)
                except TimeoutError:
                    continue
        except GatewayError:
            if outcome == "cancelled":
                outcome = "refused"  # 404/409/503 decided while waiting
            raise
        finally:
            self._waiting[key] -= 1
            if not self._waiting[key]:
                del self._waiting[key]
            self.metrics.queue_left(outcome, time.monotonic() - started)

    def try_acquire(self, model: str | None) -> Lease | None:
        """A lease right now when nobody waits and one is free; None means call acquire()."""
        if self._waiting:
            return None
        decision = self._decide(model)
        if isinstance(decision, Lease):
            self.metrics.admitted_now()
            return decision
        return None

    def release(self, lease: Lease) -> None:
        """Account for a finished request and wake waiters."""
        if lease.target.route_name == "cloud":
            self.cloud_in_flight -= 1
            self.metrics.in_flight_cloud.dec()
        else:
            self._control.manager.release_slot()
            self.metrics.in_flight_local.dec()
            elapsed = time.monotonic() - lease.started
            self._service_time_s = 0.8 * self._service_time_s + 0.2 * elapsed
        self._notify()

    def _decide(
        self, model: str | None, *, ahead: int = 0, waited_s: float | None = None
    ) -> Lease | _Wait:
        """Local, cloud or wait for a request with `ahead` queued before it, arriving
        (waited_s None) or queued for waited_s."""
        manager = self._control.manager
        status = manager.status()
        job = manager.current_job
        wanted = self._wanted_profile(model, status)
        if status.state is EngineState.READY and wanted == status.profile_id and not status.asleep:
            if self.local_in_flight < self.config.max_local:
                return self._local(model, status)
            if self._overflows(ahead, waited_s):
                lease = self._overflow(model)
                if lease is not None:
                    return lease
            return _Wait(f"all {self.config.max_local} local slots are busy")
        if (
            wanted is not None
            and wanted != status.profile_id
            and (job is None or job.profile_id != wanted)
        ):
            return self._other_model(wanted, model, status)
        lease = self._overflow(model)
        if lease is not None:
            return lease
        if job is not None:
            return _Wait(f"the engine is switching to {job.profile_id}")
        # An engine that is asleep serves nothing until someone wakes it: say so at once rather
        # than hold requests. (RESTARTING is not here: requests wait for the restart.)
        if status.state in (EngineState.FAILED, EngineState.IDLE) or status.asleep:
            # The public reason (a fixed sentence per failure code), never the engine's output.
            why = status.reason or f"engine is {status.state.value}"
            raise GatewayError(
                503,
                f"No engine is serving: {why}.",
                code="engine_unavailable",
                headers=_RETRY_AFTER,
            )
        return _Wait(f"the engine is {status.state.value}")

    def loading(self, model: str | None) -> str | None:
        """The model that a request for `model`, waiting, waits to be loaded (a switch, a start
        or a restart after a crash in progress); None when it waits for something else, such as
        a free slot.

        The requested name when it is the model loading, else the loading profile's name (a
        request for another model waits for this switch before its own).
        """
        manager = self._control.manager
        job = manager.current_job
        if job is not None:
            loading: str | None = job.profile_id
        else:
            status = manager.status()
            if status.state not in (
                EngineState.STARTING,
                EngineState.LOADING,
                EngineState.RESTARTING,
            ):
                return None
            loading = status.profile_id
        if loading is None:
            return None
        if model and model != CURRENT:
            profile = self._control.profiles.by_served_name(model)
            if profile is not None and profile.id == loading:
                return model
        try:
            return self._control.profile(loading).served_model_name
        except ProfileNotFound:  # the profiles were reloaded without it: its id will do
            return loading

    def _overflows(self, ahead: int, waited_s: float | None) -> bool:
        """Whether a request that finds every local slot busy goes to the cloud (if any) now.

        Without OVERFLOW_SLO_S: at once. With it, an arriving request queues when its predicted
        wait is within the SLO and overflows when it is over; a queued one overflows once it
        has waited the SLO (the prediction was wrong), so none waits longer than the SLO for a
        local slot while the cloud could take it.
        """
        slo = self.config.overflow_slo_s
        if slo is None:
            return True
        if waited_s is None:
            return self.predicted_wait_s(ahead) > slo
        return waited_s >= slo

    def _other_model(self, wanted: str, model: str | None, status: EngineStatus) -> Lease | _Wait:
        """A model that is not the loaded one: switch to it (AUTO_SWITCH) and/or overflow."""
        if self.config.auto_switch:
            # Start the switch first, so a cloud upstream only bridges the wait.
            waiting = self._not_loaded(wanted, model, status)
            lease = self._overflow(model)
            return lease if lease is not None else waiting
        lease = self._overflow(model)
        if lease is not None:
            return lease
        return self._not_loaded(wanted, model, status)

    def _wanted_profile(self, model: str | None, status: EngineStatus) -> str | None:
        if model is None or model == CURRENT or model in status.served_names:
            job = self._control.manager.current_job
            return status.profile_id or (job.profile_id if job else None)
        profile = self._control.profiles.by_served_name(model)
        if profile is not None:
            return profile.id
        if self.config.cloud is not None and model in self.config.cloud.model_map.values():
            return None
        served = sorted({*status.served_names, *self._all_served_names()})
        raise GatewayError(
            404,
            f"The model {self.quoted_model(model)} does not exist. Available: {', '.join(served)}.",
            code="model_not_found",
            param="model",
        )

    def _all_served_names(self) -> list[str]:
        names: list[str] = []
        for profile in self._control.profiles.profiles.values():
            names.extend(profile.served_names)
        return names

    def _not_loaded(self, wanted: str | None, model: str | None, status: EngineStatus) -> _Wait:
        if wanted is None or wanted == EXTERNAL_PROFILE:
            raise GatewayError(
                503, "No engine is serving.", code="engine_unavailable", headers=_RETRY_AFTER
            )
        if not self.config.auto_switch:
            if (
                status.state is EngineState.IDLE
                and status.reason
                and self._control.manager.current_job is None
            ):
                # Nothing runs and the manager knows why (e.g. the default profile does not fit
                # this machine): that reason says more than "switch to it".
                raise GatewayError(
                    503,
                    f"No engine is serving: {status.reason}.",
                    code="engine_unavailable",
                    headers=_RETRY_AFTER,
                )
            raise GatewayError(
                404,
                f"The model {self.quoted_model(model)} is not loaded "
                f"(active: {status.served_model_name or 'none'})."
                " Switch with POST /api/models/switch, or enable AUTO_SWITCH.",
                code="model_not_loaded",
                param="model",
            )
        # No thrash: requests for the loaded model (by any of its names, or "current") go
        # first; the switch waits for them.
        waiting = self._waiting
        if status.state is EngineState.READY and (
            waiting.get(status.profile_id, 0)
            or waiting.get(_CURRENT_KEY, 0)
            or self.local_in_flight
        ):
            return _Wait(f"waiting for requests to {status.served_model_name} before switching")
        try:
            self._control.switch(wanted)
        except ProfileDoesNotFit as exc:
            raise GatewayError(
                409,
                f"The model {self.quoted_model(model)} does not fit this hardware: "
                f"{'; '.join(exc.verdict.reasons)}",
                code="profile_does_not_fit",
                param="model",
            ) from None
        except EngineBusy as exc:
            # Another switch is running: wait for it like the requests already queued.
            return _Wait(str(exc))
        return _Wait(f"loading {wanted}")

    def _local(self, model: str | None, status: EngineStatus) -> Lease | _Wait:
        if not self._control.manager.acquire_slot():
            return _Wait("the engine is not ready")
        names = status.served_names or (status.served_model_name or "",)
        upstream_model = model if model in names else names[0]
        spec = self._control.manager.spec
        headers = {"Authorization": f"Bearer {spec.api_key}"} if spec and spec.api_key else {}
        target = Target(
            route_name="local",
            api_base=f"{status.base_url}/v1",
            model=upstream_model,
            headers=headers,
        )
        self.metrics.in_flight_local.inc()
        return Lease(target=target, scheduler=self)

    def _overflow(self, model: str | None) -> Lease | None:
        cloud = self.config.cloud
        if cloud is None or not self.config.enabled:
            return None
        self.cloud_in_flight += 1
        self.overflow_count += 1
        self.metrics.in_flight_cloud.inc()
        self.metrics.overflowed(model)
        target = Target(
            route_name="cloud",
            api_base=cloud.api_base,
            model=cloud.model_for(model),
            headers={"Authorization": f"Bearer {cloud.api_key}"},
        )
        return Lease(target=target, scheduler=self)
