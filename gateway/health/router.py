"""GET /health (liveness) and GET /health/ready (readiness)."""

from __future__ import annotations

import time

from fastapi import APIRouter

from gateway import __version__
from gateway.health import service
from gateway.health.deps import HealthDep
from gateway.health.schemas import Liveness, Readiness
from gateway.responses import JSONResponse

router = APIRouter(tags=["health"])

READY_RETRY_AFTER_S = "5"


@router.get("/health", response_model=Liveness)
async def liveness(state: HealthDep) -> Liveness:
    """The process is alive; says nothing about dependencies."""
    return Liveness(
        service=state.settings.APP_NAME,
        version=__version__,
        uptime_s=round(time.time() - state.started_at, 3),
    )


@router.get(
    "/health/ready",
    response_model=Readiness,
    responses={503: {"model": Readiness, "description": "A required dependency is down"}},
)
async def ready(state: HealthDep) -> JSONResponse:
    """Database, Redis (when configured) and the active engine; 503 when one required is down,
    200 with status `degraded` when only an optional one is (Redis, unless REDIS_REQUIRED)."""
    result = await service.readiness(state)
    if result.status != "not_ready":
        return JSONResponse(result.model_dump())
    return JSONResponse(
        result.model_dump(), status_code=503, headers={"Retry-After": READY_RETRY_AFTER_S}
    )
