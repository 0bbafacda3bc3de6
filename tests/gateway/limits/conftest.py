"""Limiters under test: the Redis one on the session Redis (flushed per test) and the local one
(the client is built like the gateway's: tests/helpers/redis_clients.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from redis.asyncio import Redis

from gateway.limits import Limiter, LocalLimiter, RedisLimiter
from tests.helpers.redis_clients import gateway_like_client


@pytest.fixture
async def redis_client(redis_url: str) -> AsyncIterator[Redis]:
    """A client on the flushed session Redis."""
    client = gateway_like_client(redis_url)
    try:
        yield client
    finally:
        await client.aclose()


@pytest.fixture(params=["redis", "local"])
async def limiter(request: pytest.FixtureRequest) -> AsyncIterator[Limiter]:
    """Each test using this runs once on RedisLimiter and once on LocalLimiter."""
    if request.param == "local":
        yield LocalLimiter()
        return
    request.applymarker(pytest.mark.redis)
    client = gateway_like_client(request.getfixturevalue("redis_url"))
    try:
        yield RedisLimiter(client)
    finally:
        await client.aclose()
