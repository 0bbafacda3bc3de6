"""Readiness checks: each dependency probed concurrently with a short timeout."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable

from gateway.db import ping
from gateway.health.deps import HealthResources
from gateway.health.schemas import CheckStatus, DependencyCheck, Readiness
from orchestrator.manager import EngineState

CHECK_TIMEOUT_S = 2.0


async def _timed(awaitable: Awaitable[object]) -> float:
    started = time.perf_counter()
    await asyncio.wait_for(awaitable, CHECK_TIMEOUT_S)
    return round((time.perf_counter() - started) * 1000, 2)


async def check_database(state: HealthResources) -> DependencyCheck:
    """SELECT 1 against the database."""
    try:
        latency = await _timed(ping(state.db_engine))
    except Exception as exc:
        return DependencyCheck(status="down", required=True, detail=type(exc).__name__)
    return DependencyCheck(status="up", required=True, latency_ms=latency)


async def check_redis(state: HealthResources) -> DependencyCheck:
    """PING Redis when it is configured. Required only with REDIS_REQUIRED: without Redis,
    inference goes on with per-process limits (login and the admin API answer 503), so by
    default an outage makes the gateway degraded, not unready."""
    if state.redis is None:
        return DependencyCheck(status="disabled", required=False, detail="REDIS_URL not set")
    required = state.settings.REDIS_REQUIRED
    try:
        latency = await _timed(state.redis.ping())
    except Exception as exc:
        return DependencyCheck(status="down", required=required, detail=type(exc).__name__)
    return DependencyCheck(status="up", required=required, latency_ms=latency)


# The engine is on its way back (a restart after a crash, or a start without a switch job).
_COMING_UP = frozenset({EngineState.RESTARTING, EngineState.STARTING, EngineState.LOADING})


async def check_engine(state: HealthResources) -> DependencyCheck:
    """The active engine's own health endpoint (and, for a sleep-capable engine, whether it is
    asleep). Public: the detail is the engine's stable reason and `code`, never its output
    (a crashed engine's last log line names its port and paths; admins see it in the admin
    API)."""
    required = state.engine_required
    manager = state.manager
    job = manager.current_job
    if manager.spec is None and job is None:
        if not required:
            return DependencyCheck(status="disabled", required=False, detail="no engine configured")
        # The planner's reason when none was started (ModelControl.startup records it).
        status = manager.status()
        why = status.reason or "no engine is running"
        code = status.failure.value if status.failure else None
        return DependencyCheck(status="down", required=True, detail=why, code=code)
    health = await manager.probe(CHECK_TIMEOUT_S)
    model = manager.spec.served_model_name if manager.spec else job.profile_id if job else "-"
    if health.ok:
        return DependencyCheck(
            status="up", required=required, latency_ms=health.latency_ms, detail=model
        )
    if job is not None:
        detail = f"switching to {job.profile_id}: {health.state.value}"
        return DependencyCheck(status="starting", required=required, detail=detail)
    code = health.failure.value if health.failure else None
    detail = f"{model}: {health.detail}"
    check_status: CheckStatus = "starting" if health.state in _COMING_UP else "down"
    return DependencyCheck(status=check_status, required=required, detail=detail, code=code)


async def readiness(state: HealthResources) -> Readiness:
    """Run every check: not ready when a required one is not up, degraded when an optional one
    is down."""
    database, redis, engine = await asyncio.gather(
        check_database(state), check_redis(state), check_engine(state)
    )
    checks = {"database": database, "redis": redis, "engine": engine}
    if not all(c.status == "up" for c in checks.values() if c.required):
        return Readiness(status="not_ready", checks=checks)
    # Serving, but something optional is down (Redis without REDIS_REQUIRED): still a 200.
    degraded = any(c.status == "down" for c in checks.values() if not c.required)
    return Readiness(status="degraded" if degraded else "ready", checks=checks)
