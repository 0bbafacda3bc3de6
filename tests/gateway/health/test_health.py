"""Liveness and readiness against real Postgres and Redis, including either going down."""

from __future__ import annotations

import httpx
import pytest

from tests.helpers.app import make_settings, running_app
from tests.helpers.postgres import PostgresServer
from tests.helpers.redis import RedisServer

pytestmark = [pytest.mark.postgres, pytest.mark.redis]


async def test_liveness_needs_nothing(sqlite_url: str) -> None:
    async with running_app(make_settings(DATABASE_URL=sqlite_url)) as (_, client):
        response = await client.get("/health")
    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "ok"
    assert body["uptime_s"] >= 0


async def test_ready_with_real_postgres_and_redis(postgres_url: str, redis_url: str) -> None:
    settings = make_settings(DATABASE_URL=postgres_url, REDIS_URL=redis_url)
    async with running_app(settings) as (_, client):
        response = await client.get("/health/ready")
    assert response.status_code == 200, response.text
    checks = response.json()["checks"]
    assert checks["database"]["status"] == "up"
    assert checks["redis"]["status"] == "up"
    assert checks["engine"]["status"] == "disabled"
    assert response.json()["status"] == "ready"


async def test_ready_without_redis_reports_it_disabled(sqlite_url: str) -> None:
    async with running_app(make_settings(DATABASE_URL=sqlite_url)) as (_, client):
        response = await client.get("/health/ready")
    assert response.status_code == 200
    assert response.json()["checks"]["redis"] == {
        "status": "disabled",
        "required": False,
        "latency_ms": None,
        "detail": "REDIS_URL not set",
        "code": None,
    }


async def _readiness_across_a_redis_outage(
    sqlite_url: str, **overrides: object
) -> tuple[httpx.Response, httpx.Response, httpx.Response]:
    """/health/ready with a real Redis up, stopped, then started again."""
    redis = RedisServer()
    redis.start()
    try:
        settings = make_settings(DATABASE_URL=sqlite_url, REDIS_URL=redis.url, **overrides)
        async with running_app(settings) as (_, client):
            up = await client.get("/health/ready")
            redis.stop()
            down = await client.get("/health/ready")
            assert (await client.get("/health")).status_code == 200
            redis.start()
            recovered = await client.get("/health/ready")
    finally:
        redis.close()
    return up, down, recovered


async def test_redis_down_is_degraded_not_unready_by_default(sqlite_url: str) -> None:
    # Inference goes on with per-process limits: pulling every replica would be the outage.
    up, down, recovered = await _readiness_across_a_redis_outage(sqlite_url)
    assert up.status_code == 200
    assert up.json()["status"] == "ready"
    assert up.json()["checks"]["redis"]["required"] is False
    assert down.status_code == 200, down.text
    assert "retry-after" not in down.headers
    assert down.json()["status"] == "degraded"
    assert down.json()["checks"]["redis"]["status"] == "down"
    assert down.json()["checks"]["redis"]["required"] is False
    assert down.json()["checks"]["database"]["status"] == "up"
    assert recovered.status_code == 200
    assert recovered.json()["status"] == "ready"


async def test_redis_down_is_503_when_redis_is_required(sqlite_url: str) -> None:
    up, down, recovered = await _readiness_across_a_redis_outage(sqlite_url, REDIS_REQUIRED=True)
    assert up.status_code == 200
    assert up.json()["checks"]["redis"]["required"] is True
    assert down.status_code == 503
    assert down.headers["retry-after"] == "5"
    assert down.json()["status"] == "not_ready"
    redis = down.json()["checks"]["redis"]
    assert (redis["status"], redis["required"], redis["detail"]) == (
        "down",
        True,
        "ConnectionError",
    )
    assert down.json()["checks"]["database"]["status"] == "up"
    assert recovered.status_code == 200
    assert recovered.json()["status"] == "ready"


async def test_ready_is_503_while_postgres_is_down_and_recovers() -> None:
    server = PostgresServer()
    server.start()
    try:
        url = server.create_database("ready_probe")
        async with running_app(make_settings(DATABASE_URL=url)) as (_, client):
            assert (await client.get("/health/ready")).status_code == 200
            server.pause()
            down = await client.get("/health/ready")
            server.resume()
            recovered = await client.get("/health/ready")
    finally:
        server.stop()
    assert down.status_code == 503
    assert down.json()["checks"]["database"]["status"] == "down"
    assert recovered.status_code == 200, recovered.text
