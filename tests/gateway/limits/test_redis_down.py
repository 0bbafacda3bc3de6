"""Redis down: /v1 stays up and bounded per process, login, refresh, logout and the admin API
fail closed, readiness says so; everything recovers when Redis is back."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import httpx
import pytest
from prometheus_client import REGISTRY

from tests.helpers.polling import eventually
from tests.helpers.quota import (
    ADMIN,
    ADMIN_PASSWORD,
    bearer,
    chat,
    create_key,
    error_code,
    quota_gateway,
    quota_settings,
    remaining,
)
from tests.helpers.redis import RedisServer

pytestmark = [pytest.mark.postgres, pytest.mark.redis]

LIMIT = 3


@pytest.fixture
def private_redis() -> Iterator[RedisServer]:
    """A Redis of this test's own, to stop and start."""
    server = RedisServer()
    server.start()
    try:
        yield server
    finally:
        server.close()


async def _admin_login(http: httpx.AsyncClient) -> httpx.Response:
    return await http.post(
        "/api/auth/login", json={"username": "admin", "password": ADMIN_PASSWORD}
    )


async def _readiness(http: httpx.AsyncClient) -> tuple[int, dict[str, str]]:
    reply = await http.get("/health/ready")
    checks = reply.json()["checks"]
    return reply.status_code, {name: check["status"] for name, check in checks.items()}


async def test_inference_falls_back_per_process_and_login_fails_closed(
    pg_url: str, private_redis: RedisServer
) -> None:
    settings = quota_settings(pg_url, REDIS_URL=private_redis.url, RATE_LIMIT_FREE_PER_MINUTE=LIMIT)
    async with quota_gateway(settings) as gw:
        http = gw.http
        fallback = gw.app.state.resources.limiters.fallback
        key = bearer((await create_key(http, "outage-team", tier="free"))["key"])
        assert await _readiness(http) == (
            200, {"database": "up", "redis": "up", "engine": "up"},
        )  # fmt: skip
        signed_in = await _admin_login(http)
        assert signed_in.status_code == 200
        refresh_token = signed_in.json()["refresh_token"]
        admin_jwt = bearer(signed_in.json()["access_token"])
        before = await chat(http, key)
        assert before.status_code == 200, before.text
        assert remaining(before) == LIMIT - 1

        fallbacks_before = REGISTRY.get_sample_value("gateway_rate_limiter_fallback_total") or 0
        await asyncio.to_thread(private_redis.stop)
        # Inference goes on, limited by this process alone: a full budget of its own, then 429.
        during = [await chat(http, key, stream=n == 1) for n in range(LIMIT)]
        assert [r.status_code for r in during] == [200] * LIMIT, during[-1].text
        assert [remaining(r) for r in during] == list(range(LIMIT - 1, -1, -1))
        denied = await chat(http, key)
        assert denied.status_code == 429, denied.text
        assert error_code(denied) == "rate_limit_exceeded"
        assert denied.headers["X-RateLimit-Limit-Minute"] == str(LIMIT)
        assert int(denied.headers["Retry-After"]) >= 1
        # Every decision made locally is counted for the operators' dashboards.
        fallbacks = REGISTRY.get_sample_value("gateway_rate_limiter_fallback_total") or 0
        assert fallbacks - fallbacks_before >= LIMIT + 1
        assert fallback is not None
        assert fallback.degraded
        assert fallback.fallback_count >= LIMIT + 1
        # Readiness names Redis as the dependency that is down, and stays 200 (degraded):
        # inference is served, so a load balancer must keep this replica (REDIS_REQUIRED=false).
        assert await _readiness(http) == (
            200, {"database": "up", "redis": "down", "engine": "up"},
        )  # fmt: skip
        # Login, refresh, logout and the admin API (the model API included) are closed rather
        # than unlimited.
        refresh = {"refresh_token": refresh_token}
        for closed in (
            await _admin_login(http),
            await http.post("/api/auth/refresh", json=refresh),
            await http.post("/api/auth/logout", json=refresh),
            await http.get("/admin/api/users", headers=ADMIN),
            await http.get("/admin/api/keys", headers=admin_jwt),
            await http.get("/api/models/status", headers=ADMIN),
        ):
            assert closed.status_code == 503, (closed.request.url, closed.text)
            assert error_code(closed) == "limiter_unavailable"
            assert int(closed.headers["Retry-After"]) >= 1

        await asyncio.to_thread(private_redis.start)
        assert (await _admin_login(http)).status_code == 200
        # The refresh token was never used while closed: it still works, once.
        assert (await http.post("/api/auth/refresh", json=refresh)).status_code == 200
        assert (await http.get("/admin/api/users", headers=admin_jwt)).status_code == 200
        assert (await http.get("/api/models/status", headers=ADMIN)).status_code == 200
        assert (await _readiness(http))[0] == 200

        # Within a second inference asks Redis again; it came back empty, so the budget is full.
        async def served() -> httpx.Response | None:
            reply = await chat(http, key)
            return reply if reply.status_code == 200 else None

        recovered: httpx.Response = await eventually(served, timeout_s=5, interval_s=0.1)
        assert remaining(recovered) == LIMIT - 1
        assert not fallback.degraded
