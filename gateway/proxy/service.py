"""The proxy's one path: check the body, get a lease, relay, release."""

from __future__ import annotations

import asyncio
import functools
import itertools
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from fastapi import Request
from starlette.responses import Response

from gateway.body import read_capped_body
from gateway.engine import EXTERNAL_PROFILE
from gateway.errors import GatewayError, error_response
from gateway.fields import tier_grants
from gateway.limits.enforce import check_inference
from gateway.limits.rules import Rule
from gateway.principal import Principal
from gateway.proxy.deps import ProxyResources
from gateway.proxy.forms import FormRelay, parse_transcription
from gateway.proxy.loading import LoadingRelay, abandon, drop
from gateway.proxy.scheduler import CURRENT, Lease, Scheduler
from gateway.proxy.translated import TranslatedMessagesRelay
from gateway.proxy.upstream import Outcome, RelayResponse
from gateway.proxy.validation import (
    GENERATING_ROUTES,
    UPSTREAM_PATHS,
    Limits,
    ProxyRequest,
    Route,
    parse_request,
)
from gateway.settings import Settings
from orchestrator.engine import ManagedEngine
from orchestrator.manager import EngineState, JobKind, SwitchJob
from orchestrator.profiles import EngineApi

# A streamed request that has waited this long for a model that is loading gets its 200 and a
# loading comment, then another as often: proxies commonly give up after 60 s of silence.
LOADING_NOTICE_S = 2.0


def limits_from(settings: Settings) -> Limits:
    """The request caps from settings."""
    return Limits(
        max_n=settings.MAX_N,
        max_tokens=settings.MAX_TOKENS_CAP,
        max_body_bytes=settings.MAX_BODY_BYTES,
        max_json_depth=settings.MAX_JSON_DEPTH,
    )


def field_grants(principal: Principal, settings: Settings) -> Iterable[str]:
    """The request fields an admin allowed this caller: its API key's and its tier's (lazily:
    they are read only for a body with a field outside the data fields)."""
    return itertools.chain(principal.allowed_fields, tier_grants(settings, principal.tier))


def route_timeout(settings: Settings, route: Route) -> float:
    """The upstream timeout of a route: generating routes as chat's, the rest as embeddings'
    (a transcription generates text: chat's)."""
    if route is Route.COMPLETIONS:
        return settings.COMPLETIONS_TIMEOUT_S
    if route in GENERATING_ROUTES or route is Route.TRANSCRIPTIONS:
        return settings.CHAT_TIMEOUT_S
    return settings.EMBEDDINGS_TIMEOUT_S


# The engine API each route needs beyond chat, completions and embeddings (Profile.apis).
ROUTE_APIS = {
    Route.RESPONSES: EngineApi.RESPONSES,
    Route.MESSAGES: EngineApi.MESSAGES,
    Route.COUNT_TOKENS: EngineApi.MESSAGES,
    Route.RERANK: EngineApi.RERANK,
    Route.SCORE: EngineApi.SCORE,
    Route.TOKENIZE: EngineApi.TOKENIZE,
    Route.DETOKENIZE: EngineApi.TOKENIZE,
    Route.TRANSCRIPTIONS: EngineApi.TRANSCRIPTIONS,
}


def relay_class(
    state: ProxyResources, route: Route, lease: Lease
) -> type[RelayResponse] | GatewayError:
    """How this lease's upstream serves the route: relayed as sent, Anthropic's messages
    translated to chat completions for an engine without them, or a 400 for an engine that
    does not serve the route at all (profiles say which APIs their engine serves)."""
    api = ROUTE_APIS.get(route)
    profile_id = lease.target.profile_id
    if api is None or profile_id is None:  # every engine's route, or the cloud (its routes)
        return RelayResponse
    if api in state.models.profile(profile_id).served_apis:
        return RelayResponse
    if route is Route.MESSAGES:
        return TranslatedMessagesRelay
    return GatewayError(
        400,
        f"The engine serving {lease.target.model!r} (profile {profile_id}) does not serve "
        f"{UPSTREAM_PATHS[route]}; a profile lists its engine's APIs under 'apis'.",
        code="route_not_served",
        param="model",
    )


async def relay(
    *,
    state: ProxyResources,
    scheduler: Scheduler,
    route: Route,
    request: Request,
    principal: Principal,
) -> Response:
    """Validate, check the caller's model scope and limits, admit (local, cloud or wait) and
    build the response that relays the request; usage is counted when it finishes."""
    settings = state.settings
    body = await read_capped_body(request, settings.MAX_BODY_BYTES)
    checked = parse_request(route, body, limits_from(settings), field_grants(principal, settings))
    return await _admit_and_relay(state, scheduler, checked, request, principal, RelayResponse)


async def relay_transcription(
    *, state: ProxyResources, scheduler: Scheduler, request: Request, principal: Principal
) -> Response:
    """POST /v1/audio/transcriptions: the multipart form checked, then relayed as `relay`."""
    raw = await read_capped_body(request, state.settings.MAX_AUDIO_BYTES)
    checked = await parse_transcription(request, raw)
    return await _admit_and_relay(state, scheduler, checked, request, principal, FormRelay)


async def _admit_and_relay(
    state: ProxyResources,
    scheduler: Scheduler,
    checked: ProxyRequest,
    request: Request,
    principal: Principal,
    factory: Callable[..., RelayResponse],
) -> Response:
    """A checked request: its model scope, its limits, then admission and the relay."""
    request.state.model = scheduler.shown_model(checked.model)
    check_model_scope(principal, checked.model, state)
    admission = await admit(state=state, principal=principal, request=request)
    return await relay_checked(
        state=state,
        scheduler=scheduler,
        checked=checked,
        request=request,
        principal=principal,
        admission=admission,
        response_factory=factory,
    )


@dataclass(frozen=True)
class Admission:
    """What the limit check decided for one request (its key, token rules and headers)."""

    limit_key: str
    token_rules: tuple[Rule, ...]
    headers: dict[str, str]


async def admit(*, state: ProxyResources, principal: Principal, request: Request) -> Admission:
    """Check the caller's request limits (429 when over); the token rules apply at the end."""
    limit_key, token_rules, limit_headers = await check_inference(
        limiter=state.limiters.inference,
        settings=state.settings,
        principal=principal,
        request=request,
    )
    return Admission(limit_key, token_rules, limit_headers)


async def relay_checked(
    *,
    state: ProxyResources,
    scheduler: Scheduler,
    checked: ProxyRequest,
    request: Request,
    principal: Principal,
    admission: Admission,
    endpoint: str | None = None,
    response_factory: Callable[..., RelayResponse] = RelayResponse,
) -> Response:
    """Admit a checked request (local, cloud or wait) and build the response that relays it."""
    settings = state.settings
    route = checked.route
    limit_key, token_rules, limit_headers = (
        admission.limit_key,
        admission.token_rules,
        admission.headers,
    )
    request_id = str(request.scope.get("state", {}).get("request_id", ""))

    def build(lease: Lease) -> Response:
        """The relay of the request on this lease (which it releases when it finishes)."""
        chosen = relay_class(state, route, lease)
        if isinstance(chosen, GatewayError):
            lease.release()
            return error_response(
                chosen.status_code,
                chosen.message,
                code=chosen.code,
                param=chosen.param,
                path=request.url.path,
            )
        factory = response_factory if chosen is RelayResponse else chosen

        def finished(outcome: Outcome) -> None:
            lease.release()
            scheduler.metrics.finished(
                lease.target.model, lease.target.route_name, outcome, stream=checked.stream
            )
            usage = outcome.usage or {}
            total = int(usage.get("total_tokens") or 0)
            if total and token_rules:
                # Tokens count when they are known (a stream's at its end; estimated when it
                # was cut off, see upstream.estimated_usage), off the response path.
                state.limiters.tokens.add(limit_key, token_rules, total)
            state.usage.record(
                user_id=principal.user_id,
                key_id=principal.key_id,
                endpoint=endpoint or route.value,
                model=lease.target.model,
                status_code=outcome.status or 499,
                duration_ms=round((time.perf_counter() - outcome.started) * 1000),
                usage=usage,
                route=lease.target.route_name,
                request_id=request_id,
            )
            request.state.upstream = lease.target.route_name
            request.state.usage = outcome.usage

        try:
            return factory(
                session=state.relay_session,
                request=checked,
                target=lease.target,
                timeout_s=route_timeout(settings, route),
                idle_timeout_s=settings.STREAM_IDLE_TIMEOUT_S,
                connect_timeout_s=settings.UPSTREAM_CONNECT_TIMEOUT_S,
                on_finish=finished,
                extra_headers=limit_headers,
                on_unreachable=(
                    functools.partial(state.manager.report_unreachable, lease.target.profile_id)
                    if lease.target.route_name == "local"
                    else None
                ),
            )
        except BaseException:
            lease.release()
            raise

    cloud = scheduler.config.cloud
    cloud_ok = cloud is None or route.value in cloud.routes
    lease = scheduler.try_acquire(checked.model, cloud_ok=cloud_ok)
    if lease is not None:
        return build(lease)
    acquiring = asyncio.ensure_future(scheduler.acquire(checked.model, cloud_ok=cloud_ok))
    # A stream that waits for a model that is loading starts with comments (loading.py); not
    # /api/chat's (a custom factory), which reports a wait that fails on its stored reply.
    notices = checked.stream and response_factory in (RelayResponse, FormRelay)
    patience = LOADING_NOTICE_S if notices else None
    while (lease := await _lease_unless_gone(acquiring, request, patience)) is None:
        if scheduler.loading(checked.model) is not None:
            return LoadingRelay(
                acquiring=acquiring,
                build=build,
                loading=lambda: scheduler.loading(checked.model),
                interval_s=LOADING_NOTICE_S,
                extra_headers=limit_headers,
                route=route,
            )
    return build(lease)


async def _lease_unless_gone(
    acquiring: asyncio.Future[Lease], request: Request, patience: float | None
) -> Lease | None:
    """The lease once `acquiring` has it; None while it still waits after `patience` seconds.

    The client leaving meanwhile gives up the place in the queue (499).
    """
    gone = asyncio.ensure_future(_client_gone(request))
    either: set[asyncio.Future[Any]] = {acquiring, gone}
    try:
        done, _ = await asyncio.wait(either, timeout=patience, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        abandon(acquiring)
        raise
    finally:
        gone.cancel()
    if acquiring in done:
        return acquiring.result()
    if gone not in done:
        return None
    await drop(acquiring)
    raise GatewayError(
        499, "The client closed the request while it was queued.", code="client_gone"
    )


async def _client_gone(request: Request) -> None:
    # The body was read already, so the next message can only be the disconnect.
    while (await request.receive())["type"] != "http.disconnect":
        continue


def check_model_scope(principal: Principal, model: str | None, state: ProxyResources) -> None:
    """A key limited to some models gets 403 for any other (the active one for "current")."""
    allowed = principal.allowed_models
    if allowed is None:
        return
    names = [model] if model and model != CURRENT else list(state.manager.status().served_names)
    if not any(name in allowed for name in names):
        raise GatewayError(
            403,
            f"This API key may not use the model {state.scheduler.quoted_model(model)}.",
            code="model_not_allowed",
            param="model",
        )


# What /v1/models calls an engine's state: the words a client needs, not the state machine's.
_PUBLIC_STATES: dict[EngineState, str] = {
    EngineState.IDLE: "not_loaded",
    EngineState.STARTING: "loading",
    EngineState.LOADING: "loading",
    EngineState.RESTARTING: "loading",
    EngineState.WAKING: "loading",
    EngineState.READY: "ready",
    EngineState.SLEEPING: "sleeping",
    EngineState.ASLEEP: "sleeping",
    EngineState.DRAINING: "unloading",
    EngineState.STOPPING: "unloading",
    EngineState.FAILED: "failed",
}
# Jobs after which the model serves: while one runs for a model, it is "loading".
BRINGING_UP = frozenset({JobKind.LOAD, JobKind.WAKE, JobKind.SWITCH})


def model_state(engine: ManagedEngine | None, job: SwitchJob | None) -> str:
    """A model's state as /v1/models shows it: ready, loading, sleeping, unloading, failed or
    not_loaded."""
    if engine is not None and engine.serves:
        return "ready"
    if job is not None and job.kind in BRINGING_UP:
        return "loading"
    if engine is None:
        return "not_loaded"
    if engine.status().asleep:  # ASLEEP, or READY but put to sleep outside the gateway
        return "sleeping"
    return _PUBLIC_STATES[engine.state]


def model_entries(*, state: ProxyResources) -> list[dict[str, Any]]:
    """One entry per model this gateway can serve: resident (awake or asleep), being loaded,
    or loadable because the planner says it fits the GPUs alone. A model that can never run
    here is not listed (GET /api/models/profiles says why). Aliases are a field of their
    model's entry; each entry has the model's state and its last load and wake times."""
    control = state.models
    fleet = control.manager
    created = int(state.started_at)
    entries: list[dict[str, Any]] = []
    for profile_id, verdict in control.verdicts().items():
        engine = fleet.engine(profile_id)
        job = fleet.job_for(profile_id)
        resident = engine is not None and engine.resident
        if not (resident or job is not None or verdict.fits):
            continue
        profile = control.profile(profile_id)
        listed = engine.served_names if engine is not None else ()
        if profile_id == EXTERNAL_PROFILE:
            # An engine someone else runs serves what it lists; nothing until it has.
            names = listed
        else:
            names = tuple(dict.fromkeys((*profile.served_names, *listed)))
        if not names:
            continue
        status = engine.status() if engine is not None else None
        entries.append(
            {
                "id": names[0],
                "created": created,
                "profile": profile_id,
                "state": model_state(engine, job),
                "aliases": list(names[1:]),
                "load_s": status.last_load_s if status else None,
                "wake_s": status.last_wake_s if status else None,
            }
        )
    return entries
