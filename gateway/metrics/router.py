"""`GET /metrics`: the Prometheus text format, for Prometheus only.

Who may scrape: with METRICS_TOKEN set, a caller sending it as `Authorization: Bearer <token>`
(compared in constant time; user logins, API keys and the admin key are not scrape
credentials). Without it, only a direct loopback peer (no proxy headers, not a trusted proxy):
the same stance as REQUIRE_AUTH=false, fine on one machine, closed to a network.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress

from fastapi import APIRouter, Request
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.responses import Response

from gateway.errors import GatewayError
from gateway.metrics.exposition import render_latest, run_before_scrape
from gateway.metrics.recorders import count_auth_failure
from gateway.settings import Settings

router = APIRouter(tags=["metrics"], include_in_schema=False)

_BEARER = "bearer "
_PROXY_HEADERS = ("forwarded", "x-forwarded-for", "x-real-ip")


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    """Every gateway series (merged across worker processes in multiprocess mode)."""
    check_scrape_access(request, request.app.state.settings)
    run_before_scrape()  # on the event loop: the state it reads is the loop's
    # Reading the multiprocess files (or a large registry) is blocking work.
    body = await asyncio.to_thread(render_latest)
    return Response(body, media_type=CONTENT_TYPE_LATEST, headers={"Cache-Control": "no-store"})


def check_scrape_access(request: Request, settings: Settings) -> None:
    """401 without the right METRICS_TOKEN; without a token configured, 403 off the loopback."""
    token = settings.METRICS_TOKEN
    if token is not None:
        header = request.headers.get("authorization", "")
        sent = header[len(_BEARER) :].strip() if header[: len(_BEARER)].lower() == _BEARER else ""
        if not sent or not hmac.compare_digest(sent.encode(), token.get_secret_value().encode()):
            count_auth_failure("invalid_metrics_token")
            raise GatewayError(
                401,
                "Scraping needs 'Authorization: Bearer <METRICS_TOKEN>'.",
                code="invalid_metrics_token",
                headers={"WWW-Authenticate": "Bearer"},
            )
        return
    if not _direct_loopback(request, settings):
        count_auth_failure("metrics_loopback_only")
        raise GatewayError(
            403,
            "METRICS_TOKEN is not set, so /metrics answers only on the loopback; "
            "set it to scrape from another host.",
            code="metrics_loopback_only",
        )


def _direct_loopback(request: Request, settings: Settings) -> bool:
    """A peer on the loopback that is not relaying someone else's request."""
    peer = request.client.host if request.client else ""
    if settings.is_trusted_proxy(peer):
        return False
    try:
        loopback = ipaddress.ip_address(peer).is_loopback
    except ValueError:
        return False
    # A reverse proxy on the same host connects from the loopback for the whole world.
    return loopback and not any(name in request.headers for name in _PROXY_HEADERS)
