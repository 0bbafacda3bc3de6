"""Health response shapes."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

CheckStatus = Literal["up", "down", "disabled", "starting"]


class Liveness(BaseModel):
    """The process is up and serving HTTP."""

    status: Literal["ok"] = "ok"
    service: str
    version: str
    uptime_s: float


class DependencyCheck(BaseModel):
    """One dependency's state."""

    status: CheckStatus
    required: bool
    latency_ms: float | None = None
    detail: str | None = None
    code: str | None = Field(
        default=None,
        description="Why a dependency does not serve, as a stable code (the engine's: "
        "engine_crashed, engine_restarting, engine_crash_loop, engine_asleep, ...).",
    )


class Readiness(BaseModel):
    """Whether the gateway can serve traffic, per dependency."""

    status: Literal["ready", "degraded", "not_ready"] = Field(
        description="not_ready (503): a required dependency is not up; degraded (200): serving, "
        "but an optional one (Redis unless REDIS_REQUIRED) is down."
    )
    checks: dict[str, DependencyCheck]
