"""Admission: which engine (or cloud upstream) serves a request, and when.

A request names a model (a served name or alias; "current" or none is the default engine). Its
engine serves it up to its slots (`max_concurrency`, else MAX_QUEUE_SIZE, seed:
max_queue_size). With a cloud upstream configured, a request overflows to it when its engine
is down or loading, and when it is saturated: at once without OVERFLOW_SLO_S; with it, only
when the request's predicted wait for a slot exceeds the SLO or it has waited the SLO
(`_overflows`). Without a cloud upstream it waits in a bounded queue for a bounded time.

Requests for a model that is loading, waking or restarting wait for it. A model the fleet put
to sleep is woken; with AUTO_SWITCH a model that is not resident is loaded, evicting what the
placement needs. No thrash: while a victim still has requests in flight or waiting, the swap
waits for them, up to SWAP_MAX_WAIT_S (a request never waits longer for a swap it needs).
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
from orchestrator.engine import COMING_UP_STATES, ManagedEngine
from orchestrator.manager import EngineBusy, EngineState
from orchestrator.profiles import Engine

CURRENT = "current"
_RETRY_AFTER = {"Retry-After": "5"}
# The waiters' key of requests for "current" (no profile id has angle brackets).
_CURRENT_KEY = "<current>"
# A vLLM engine batches concurrent requests: without a profile's max_concurrency (or an
# explicit MAX_QUEUE_SIZE) it gets this many local slots, not the 4 meant for one-at-a-time
# engines (vLLM's own scheduler then decides; its default max_num_seqs is larger still).
VLLM_DEFAULT_SLOTS = 64
# States in which a request for the engine waits for it rather than starting anything.
_ON_THE_WAY = COMING_UP_STATES | {
    EngineState.SLEEPING,
    EngineState.DRAINING,
    EngineState.STOPPING,
}
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
    # The routes (gateway.proxy.validation.Route values) it speaks.
    routes: frozenset[str] = frozenset({"chat", "completions", "embeddings", "responses"})

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
    swap_max_wait_s: float = 30.0
    # Whether MAX_QUEUE_SIZE was set (then it bounds vLLM engines too, as the seed's setting).
    max_local_set: bool = False
    enabled: bool = True
    # Model names starting like one of these are never logged or echoed (see shown_model):
    # API_KEY_PREFIX and the start of ADMIN_API_KEY, besides KEY_LIKE_PREFIX.
    secret_prefixes: tuple[str, ...] = ()


@dataclass
class Lease:
    """Permission to send one request to one upstream; released exactly once."""

    target: Target
    scheduler: Scheduler
    engine: ManagedEngine | None = None
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
    # Decide again once the request has waited this long (the no-thrash bound).
    until_waited_s: float | None = None


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
        self._wanted_profile(model)

    # -- admission ---------------------------------------------------------------------------

    async def acquire(self, model: str | None, *, cloud_ok: bool = True) -> Lease:
        """Wait (bounded) until the request may go to the local engine or the cloud (only
        `cloud_ok`: a route the cloud upstream speaks)."""
        if self.queue_depth >= self.config.max_waiting:
            # A full queue refuses only requests that would wait: one that can go now (a free
            # local slot, or the cloud) still goes. QUEUE_MAX_WAITING=0 means no queue. It
            # cannot wait, so its SLO counts as spent: a full local overflows if it can.
            decision = self._decide(model, waited_s=math.inf, cloud_ok=cloud_ok)
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
        key = _CURRENT_KEY if model is None or model == CURRENT else self._wanted_profile(model)
        self._waiting[key] = self._waiting.get(key, 0) + 1
        self.metrics.queue_entered()
        started = time.monotonic()
        deadline = started + self.config.queue_timeout_s
        slo = (
            self.config.overflow_slo_s
            if self.config.cloud and self.config.enabled and cloud_ok
            else None
        )
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
                decision = self._decide(
                    model, ahead=self.queue_depth - 1, waited_s=waited_s, cloud_ok=cloud_ok
                )
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
                bound = decision.until_waited_s
                if bound is not None and now - started < bound:
                    # Wake at the no-thrash bound: the swap goes ahead then.
                    remaining = min(remaining, started + bound - now + 0.001)
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

    def try_acquire(self, model: str | None, *, cloud_ok: bool = True) -> Lease | None:
        """A lease right now when nobody waits and one is free; None means call acquire()."""
        if self._waiting:
            return None
        decision = self._decide(model, cloud_ok=cloud_ok)
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
            if lease.engine is not None:
                lease.engine.release_slot()
            self.metrics.in_flight_local.dec()
            elapsed = time.monotonic() - lease.started
            self._service_time_s = 0.8 * self._service_time_s + 0.2 * elapsed
        self._notify()

    def _decide(
        self,
        model: str | None,
        *,
        ahead: int = 0,
        waited_s: float | None = None,
        cloud_ok: bool = True,
    ) -> Lease | _Wait:
        """Local, cloud or wait for a request with `ahead` queued before it, arriving
        (waited_s None) or queued for waited_s."""
        fleet = self._control.manager
        wanted = self._wanted_profile(model)
        engine = fleet.engine(wanted) if wanted is not None else None
        if engine is not None and engine.serves:
            slots = self.slots(wanted)
            if engine.in_flight < slots:
                return self._local(model, engine)
            if self._overflows(ahead, waited_s):
                lease = self._overflow(model, cloud_ok)
                if lease is not None:
                    return lease
            return _Wait(f"all {slots} local slots are busy")
        if wanted is None or (wanted == EXTERNAL_PROFILE and engine is None):
            lease = self._overflow(model, cloud_ok)
            if lease is not None:
                return lease
            # For "current" with nothing started, the manager may know why (the planner's
            # verdict on the default profile).
            why = fleet.status().reason if model in (None, CURRENT) else None
            raise GatewayError(
                503,
                f"No engine is serving: {why}." if why else "No engine is serving.",
                code="engine_unavailable",
                headers=_RETRY_AFTER,
            )
        job = fleet.job_for(wanted)
        state = engine.state if engine is not None else EngineState.IDLE
        if job is not None or state in _ON_THE_WAY:
            # Loading, waking, restarting, or on its way out of an eviction: a cloud upstream
            # bridges the wait; otherwise the request waits for it.
            lease = self._overflow(model, cloud_ok)
            if lease is not None:
                return lease
            if job is not None:
                verb = "switching to" if job.kind.value == "switch" else f"{job.kind.value}:"
                return _Wait(f"the engine is {verb} {job.profile_id}")
            return _Wait(f"{wanted} is {state.value}")
        status = engine.status() if engine is not None else fleet.status()
        if engine is not None and state is EngineState.READY and status.asleep:
            # Put to sleep outside the gateway (its own /sleep): serves nothing until woken.
            raise GatewayError(
                503,
                f"No engine is serving: {status.reason or 'the engine is asleep'}.",
                code="engine_unavailable",
                headers=_RETRY_AFTER,
            )
        if state is EngineState.FAILED or (
            state is EngineState.IDLE and wanted == fleet.default_profile_id and status.reason
        ):
            lease = self._overflow(model, cloud_ok)
            if lease is not None:
                return lease
            # The public reason (a fixed sentence per failure code), never the engine's output.
            why = status.reason or f"engine is {state.value}"
            raise GatewayError(
                503,
                f"No engine is serving: {why}.",
                code="engine_unavailable",
                headers=_RETRY_AFTER,
            )
        if state is EngineState.ASLEEP:
            return self._bring(wanted, model, waited_s, wake=True)
        if self.config.auto_switch:
            # Start the load first, so a cloud upstream only bridges the wait.
            waiting = self._bring(wanted, model, waited_s, wake=False)
            lease = self._overflow(model, cloud_ok)
            return lease if lease is not None else waiting
        lease = self._overflow(model, cloud_ok)
        if lease is not None:
            return lease
        default = fleet.engine(fleet.default_profile_id) if fleet.default_profile_id else None
        if default is None and fleet.status().reason:
            # Nothing runs and the manager knows why (e.g. the default profile does not fit
            # this machine): that reason says more than "load it".
            raise GatewayError(
                503,
                f"No engine is serving: {fleet.status().reason}.",
                code="engine_unavailable",
                headers=_RETRY_AFTER,
            )
        active = ", ".join(
            e.status().served_model_name or e.profile_id for e in fleet.engines() if e.serves
        )
        raise GatewayError(
            404,
            f"The model {self.quoted_model(model)} is not loaded (active: {active or 'none'})."
            f" Load it with POST /api/models/{wanted}/load (beside the others) or"
            " POST /api/models/switch (as the default), or enable AUTO_SWITCH.",
            code="model_not_loaded",
            param="model",
        )

    def slots(self, profile_id: str | None) -> int:
        """A model's local slots: its profile's max_concurrency; else, for a vLLM engine (which
        batches), VLLM_DEFAULT_SLOTS unless MAX_QUEUE_SIZE was set (the seed's override); for a
        llama.cpp engine its parallel slots; else MAX_QUEUE_SIZE."""
        if profile_id is None:
            return self.config.max_local
        try:
            profile = self._control.profile(profile_id)
        except ProfileNotFound:
            return self.config.max_local
        if profile.max_concurrency is not None:
            return profile.max_concurrency
        if profile.engine is Engine.VLLM and not self.config.max_local_set:
            return VLLM_DEFAULT_SLOTS
        if profile.engine is Engine.LLAMA_CPP:
            return profile.llama_cpp.parallel  # its slots: more would only queue inside it
        return self.config.max_local

    def loading(self, model: str | None) -> str | None:
        """The model that a request for `model`, waiting, waits to be loaded (a load, wake,
        switch or restart in progress); None when it waits for something else, such as a free
        slot or a swap's turn. The requested name when it names the model loading."""
        fleet = self._control.manager
        try:
            wanted = self._wanted_profile(model)
        except GatewayError:
            return None
        if wanted is None:
            return None
        engine = fleet.engine(wanted)
        coming = engine is not None and engine.state in COMING_UP_STATES
        if fleet.job_for(wanted) is None and not coming:
            return None
        if model and model != CURRENT:
            profile = self._control.profiles.by_served_name(model)
            if profile is not None and profile.id == wanted:
                return model
        try:
            return self._control.profile(wanted).served_model_name
        except ProfileNotFound:  # the profiles were reloaded without it: its id will do
            return wanted

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

    def _wanted_profile(self, model: str | None) -> str | None:
        """The profile a request's model names: the default engine's for "current" or none (or
        the profile a switch is loading), a profile by served name or alias, or any resident
        engine that lists the name (an external engine's own names); None for a model only
        the cloud upstream serves. 404 for a name nothing here serves."""
        fleet = self._control.manager
        if model is None or model == CURRENT:
            job = fleet.current_job
            return fleet.default_profile_id or (job.profile_id if job else None)
        default = fleet.default_profile_id
        if default is not None:
            engine = fleet.engine(default)
            if engine is not None and model in engine.served_names:
                return default
        profile = self._control.profiles.by_served_name(model)
        if profile is not None:
            return profile.id
        for engine in fleet.engines():
            if model in engine.served_names:
                return engine.profile_id
        if self.config.cloud is not None and model in self.config.cloud.model_map.values():
            return None
        served = sorted(
            {*(n for e in fleet.engines() for n in e.served_names), *self._all_served_names()}
        )
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

    def queued_for(self, profile_id: str) -> int:
        """Requests waiting for a profile's engine (a slot, its load or its wake); those for
        "current" count for the default engine."""
        return self._waiters_for(profile_id)

    def _waiters_for(self, profile_id: str) -> int:
        waiting = self._waiting.get(profile_id, 0)
        if profile_id == self._control.manager.default_profile_id:
            waiting += self._waiting.get(_CURRENT_KEY, 0)
        return waiting

    def _bring(
        self, wanted: str, model: str | None, waited_s: float | None, *, wake: bool
    ) -> _Wait:
        """Wake or load `wanted`, unless the engines it would evict still have requests in
        flight or waiting and this request has not yet waited SWAP_MAX_WAIT_S (no thrash)."""
        fleet = self._control.manager
        try:
            self._control.check_fits(wanted)
        except ProfileDoesNotFit as exc:
            # A model that can never run here is not one this gateway serves (it is not listed
            # in /v1/models either): 404, with the planner's reasons.
            raise GatewayError(
                404,
                f"The model {self.quoted_model(model)} cannot run on this hardware: "
                f"{'; '.join(exc.verdict.reasons)}",
                code="profile_does_not_fit",
                param="model",
            ) from None
        victims = fleet.victims_for(wanted)
        if victims is None:
            raise GatewayError(
                503,
                f"The model {self.quoted_model(model)} cannot be placed beside the pinned "
                "engines; an administrator must unload one.",
                code="no_room",
                headers=_RETRY_AFTER,
            )
        bound = self.config.swap_max_wait_s
        waited = waited_s or 0.0
        contested = [
            e
            for v in victims
            if (e := fleet.engine(v)) is not None
            and (
                e.in_flight
                or self._waiters_for(v)
                or e.state in COMING_UP_STATES
                or fleet.job_for(v) is not None
            )
        ]
        if contested:
            # Serve the resident model's queue first, for at most the fairness bound. The bound
            # counts from when the victim last became ready, not only from this request's
            # arrival: a model that was just swapped in gets its turn (its waiters are served)
            # before requests that waited through its load swap it out again, or the two
            # would swap back and forth without serving anyone.
            # A victim still on its way up (loading, waking, a job acting on it) has not had
            # its turn at all: evicting it as soon as it is ready would serve nobody.
            now = time.monotonic()
            turn = min(
                now - e.ready_since if e.serves and e.ready_since is not None else 0.0
                for e in contested
            )
            effective = min(waited, turn)
            if effective < bound:
                names = ", ".join(e.profile_id for e in contested)
                return _Wait(
                    f"waiting for requests to {names} before swapping (at most {bound:g}s)",
                    until_waited_s=waited + (bound - effective),
                )
        try:
            job = fleet.request_wake(wanted) if wake else fleet.request_load(wanted)
        except EngineBusy as exc:
            # Another job acts on it: wait for it like the requests already queued.
            return _Wait(str(exc))
        self.metrics.swap_requested(wanted, waited)
        return _Wait(f"{job.kind.value}: {wanted}")

    def _local(self, model: str | None, engine: ManagedEngine) -> Lease | _Wait:
        if not engine.acquire_slot():
            return _Wait("the engine is not ready")
        spec = engine.spec
        names = engine.served_names or ((spec.served_model_name,) if spec else ("",))
        upstream_model = model if model in names else names[0]
        headers = {"Authorization": f"Bearer {spec.api_key}"} if spec and spec.api_key else {}
        target = Target(
            route_name="local",
            api_base=f"{engine.base_url}/v1",
            model=upstream_model,
            headers=headers,
            profile_id=engine.profile_id,
        )
        self.metrics.in_flight_local.inc()
        return Lease(target=target, scheduler=self, engine=engine)

    def _overflow(self, model: str | None, cloud_ok: bool) -> Lease | None:
        cloud = self.config.cloud
        if cloud is None or not self.config.enabled or not cloud_ok:
            return None
        self.cloud_in_flight += 1
        self.overflow_count += 1
        self.metrics.in_flight_cloud.inc()
        self.metrics.overflowed(model)
        target = Target(
            route_name="cloud",
            api_base=cloud.api_base,
            model=cloud.model_for(model),
            # Anthropic's API reads its key from x-api-key; OpenAI's from Authorization.
            headers={"Authorization": f"Bearer {cloud.api_key}", "x-api-key": cloud.api_key},
        )
        return Lease(target=target, scheduler=self)
