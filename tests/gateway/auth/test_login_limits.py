"""Login is rate limited per IP, and fails closed when the shared limiter (Redis) is down."""

from __future__ import annotations

import pytest

from tests.helpers.app import running_app
from tests.helpers.auth import ADMIN_PASSWORD, auth_settings
from tests.helpers.redis import RedisServer

pytestmark = [pytest.mark.redis]


async def test_login_attempts_are_limited_per_ip(sqlite_url: str) -> None:
    settings = auth_settings(sqlite_url, LOGIN_RATE_LIMIT_PER_MINUTE=3)
    async with running_app(settings) as (_, client):
        codes = [
            (
                await client.post(
                    "/api/auth/login", json={"username": "admin", "password": "wrong-guess"}
                )
            ).status_code
            for _ in range(5)
        ]
        limited = await client.post(
            "/api/auth/login", json={"username": "admin", "password": ADMIN_PASSWORD}
        )
    assert codes == [401, 401, 401, 429, 429]
    assert limited.status_code == 429
    assert int(limited.headers["retry-after"]) >= 1
    assert limited.headers["x-ratelimit-limit-minute"] == "3"
    assert limited.json()["error"]["type"] == "rate_limit_error"


async def test_login_fails_closed_while_redis_is_down(sqlite_url: str) -> None:
    redis = RedisServer()
    redis.start()
    try:
        settings = auth_settings(sqlite_url, REDIS_URL=redis.url)
        async with running_app(settings) as (_, client):
            body = {"username": "admin", "password": ADMIN_PASSWORD}
            up = await client.post("/api/auth/login", json=body)
            redis.stop()
            down = await client.post("/api/auth/login", json=body)
            redis.start()
            again = await client.post("/api/auth/login", json=body)
    finally:
        redis.close()
    assert up.status_code == 200
    assert down.status_code == 503
    assert down.json()["error"]["code"] == "limiter_unavailable"
    assert "retry-after" in down.headers
    assert again.status_code == 200
