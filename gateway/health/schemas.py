"""Health response shapes."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel

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


class Readiness(BaseModel):
    """Whether the gateway can serve traffic, per dependency."""

    status: Literal["ready", "not_ready"]
    checks: dict[str, DependencyCheck]
