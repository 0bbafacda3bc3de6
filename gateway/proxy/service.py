"""The proxy's one path: check the body, get a lease, relay, release."""

from __future__ import annotations

import time
from typing import Any

from gateway.proxy.scheduler import Lease, Scheduler
from gateway.proxy.upstream import Outcome, RelayResponse
from gateway.proxy.validation import Limits, Route, parse_request
from gateway.settings import Settings
from gateway.state import AppState


def limits_from(settings: Settings) -> Limits:
    """The request caps from settings."""
    return Limits(
        max_n=settings.MAX_N,
        max_tokens=settings.MAX_TOKENS_CAP,
        max_body_bytes=settings.MAX_BODY_BYTES,
    )


def route_timeout(settings: Settings, route: Route) -> float:
    """The upstream timeout of a route."""
    return {
        Route.CHAT: settings.CHAT_TIMEOUT_S,
        Route.COMPLETIONS: settings.COMPLETIONS_TIMEOUT_S,
        Route.EMBEDDINGS: settings.EMBEDDINGS_TIMEOUT_S,
    }[route]


async def relay(
    *, state: AppState, scheduler: Scheduler, route: Route, raw: bytes, request_state: Any
) -> RelayResponse:
    """Validate, admit (local, cloud or wait) and build the response that relays the request."""
    settings = state.settings
    request = parse_request(route, raw, limits_from(settings))
    request_state.model = request.model
    lease: Lease = await scheduler.acquire(request.model)

    def finished(outcome: Outcome) -> None:
        lease.release()
        request_state.upstream = lease.target.route_name
        request_state.usage = outcome.usage
        request_state.upstream_ms = round((time.perf_counter() - outcome.started) * 1000, 2)

    try:
        return RelayResponse(
            http=state.http,
            request=request,
            target=lease.target,
            timeout_s=route_timeout(settings, route),
            idle_timeout_s=settings.STREAM_IDLE_TIMEOUT_S,
            connect_timeout_s=settings.UPSTREAM_CONNECT_TIMEOUT_S,
            on_finish=finished,
        )
    except BaseException:
        lease.release()
        raise


def model_entries(*, state: AppState) -> list[dict[str, Any]]:
    """Served names and aliases of every profile, with the state of each profile here."""
    control = state.models
    status = control.status()
    job = control.manager.current_job
    created = int(state.started_at)
    entries: list[dict[str, Any]] = []
    for profile_id, verdict in control.verdicts().items():
        profile = control.profile(profile_id)
        if profile_id == status.profile_id:
            model_state = status.state.value
        elif job is not None and job.profile_id == profile_id:
            model_state = "loading"
        else:
            model_state = "available" if verdict.fits else "does_not_fit"
        names = profile.served_names
        if profile_id == status.profile_id and status.served_names:
            names = tuple(dict.fromkeys((*status.served_names, *names)))
        if profile_id == "external":
            names = status.served_names if profile_id == status.profile_id else ()
        entries.extend(
            {"id": name, "created": created, "profile": profile_id, "state": model_state}
            for name in names
        )
    return entries
