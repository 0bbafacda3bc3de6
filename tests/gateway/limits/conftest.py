"""Limiters under test: the Redis one on the session Redis (flushed per test) and the local one."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from redis.asyncio import Redis

from gateway.limits import Limiter, LocalLimiter, RedisLimiter


def gateway_like_client(url: str) -> Redis:
    """A client configured like the gateway's own (default retries with backoff included)."""
    client: Redis = Redis.from_url(url, socket_timeout=2.0, socket_connect_timeout=2.0)
    return client


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
