"""Redis down: inference falls back to per-process limits; login and admin fail closed.

These tests stop and restart a Redis of their own, so the session Redis is never disturbed.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator

import pytest
import redis.exceptions
from redis.asyncio import Redis
from structlog.testing import capture_logs

from gateway.limits import (
    FailClosedLimiter,
    FallbackLimiter,
    LimiterUnavailable,
    LocalLimiter,
    RedisLimiter,
    Rule,
)
from tests.helpers.ports import free_port
from tests.helpers.redis import RedisServer
from tests.helpers.redis_clients import gateway_like_client

pytestmark = pytest.mark.redis

RULES = (Rule("minute", 5, 60),)


@pytest.fixture(scope="module")
def own_redis(redis_server: RedisServer) -> Iterator[RedisServer]:
    """A Redis on a fixed port that these tests may stop; restarts come back on the same port.

    Depends on the session Redis only for its binary (and its skip when there is none).
    """
    server = RedisServer(port=free_port(), binary=redis_server.binary)
    server.start()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
async def own_client(own_redis: RedisServer) -> AsyncIterator[Redis]:
    """A gateway-like client on ``own_redis``, which is running and empty when the test starts."""
    own_redis.start()
    client = gateway_like_client(own_redis.url)
    await client.flushall()
    try:
        yield client
    finally:
        await client.aclose()


@pytest.fixture
async def hung_redis_url() -> AsyncIterator[str]:
    """A TCP server that accepts connections and never answers: a Redis that hangs."""
    writers: list[asyncio.StreamWriter] = []

    async def swallow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.append(writer)
        while await reader.read(4096):
            continue
        writer.close()

    server = await asyncio.start_server(swallow, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        server.close()
        for writer in writers:
            writer.close()
        await server.wait_closed()


async def _until_redis_answers(limiter: FallbackLimiter, key: str) -> None:
    """Call until a call reaches Redis again (the first may still hit a dead pooled socket)."""
    deadline = time.monotonic() + 10
    while True:
        await limiter.peek(key, RULES)
        if not limiter.degraded:
            return
        assert time.monotonic() < deadline, "FallbackLimiter never went back to Redis"
        await asyncio.sleep(0.1)


async def test_fallback_bounds_inference_per_process_and_recovers(
    own_redis: RedisServer, own_client: Redis
) -> None:
    fallbacks: list[int] = []
    limiter = FallbackLimiter(
        RedisLimiter(own_client, timeout_s=0.3),
        LocalLimiter(),
        warn_interval_s=60,
        on_fallback=lambda: fallbacks.append(1),
        probe_interval_s=0.1,
    )
    assert (await limiter.hit("user:1", RULES)).rule("minute").remaining == 4  # on Redis
    assert not limiter.degraded

    own_redis.stop()
    try:
        with capture_logs() as logs:
            started = time.monotonic()
            decisions = [await limiter.hit("user:1", RULES) for _ in range(7)]
            elapsed = time.monotonic() - started
        # The local limiter knows nothing of the hit counted in Redis: it allows its own 5.
        assert [d.allowed for d in decisions] == [True] * 5 + [False] * 2
        assert decisions[5].retry_after_s == 12
        assert limiter.degraded
        assert limiter.fallback_count == 7
        assert len(fallbacks) == 7
        warnings = [e for e in logs if e["event"] == "rate_limiter_degraded"]
        assert len(warnings) == 1
        assert warnings[0]["log_level"] == "warning"
        assert elapsed < 1.0  # a refused connection fails at once
    finally:
        own_redis.start()

    with capture_logs() as logs:
        await _until_redis_answers(limiter, "user:1")
    assert [e["event"] for e in logs if e["log_level"] == "info"] == ["rate_limiter_recovered"]
    count = limiter.fallback_count
    back = await limiter.hit("user:1", RULES)
    # The restarted Redis is empty: this hit is its first, so the count comes from Redis.
    assert back.rule("minute").remaining == 4
    assert await own_client.exists("rl:user:1:minute") == 1
    assert limiter.fallback_count == count
    await limiter.ping()


async def test_fallback_warns_once_per_interval_and_covers_every_call() -> None:
    closed = gateway_like_client(f"redis://127.0.0.1:{free_port()}/0")  # nothing listens there
    fallbacks: list[int] = []
    limiter = FallbackLimiter(
        RedisLimiter(closed, timeout_s=0.3),
        LocalLimiter(),
        warn_interval_s=0.3,
        on_fallback=lambda: fallbacks.append(1),
        probe_interval_s=0.05,
    )
    tokens = (Rule("tokens-minute", 100, 60),)
    try:
        with capture_logs() as logs:
            await limiter.add("user:1", tokens, 150)
            assert not (await limiter.peek("user:1", tokens)).allowed
            assert (await limiter.hit("user:2", RULES)).allowed
            await asyncio.sleep(0.35)
            assert (await limiter.hit("user:2", RULES)).rule("minute").remaining == 3
        warnings = [e for e in logs if e["event"] == "rate_limiter_degraded"]
        assert len(warnings) == 2
        assert [w["operation"] for w in warnings] == ["add", "hit"]
        assert limiter.fallback_count == 4
        assert len(fallbacks) == 4
        assert limiter.degraded
        with pytest.raises(redis.exceptions.ConnectionError):
            await limiter.ping()  # readiness sees that Redis is down
    finally:
        await closed.aclose()


async def test_fail_closed_refuses_while_redis_is_down(
    own_redis: RedisServer, own_client: Redis
) -> None:
    limiter = FailClosedLimiter(RedisLimiter(own_client, timeout_s=0.3))
    assert (await limiter.hit("login:192.0.2.1", RULES)).rule("minute").remaining == 4
    own_redis.stop()
    try:
        started = time.monotonic()
        with pytest.raises(LimiterUnavailable) as refused:
            await limiter.hit("login:192.0.2.1", RULES)
        assert refused.value.retry_after_s >= 1
        with pytest.raises(LimiterUnavailable):
            await limiter.peek("login:192.0.2.1", RULES)
        with pytest.raises(LimiterUnavailable):
            await limiter.add("login:192.0.2.1", RULES, 1)
        with pytest.raises(LimiterUnavailable):
            await limiter.ping()
        assert time.monotonic() - started < 2.0
    finally:
        own_redis.start()
    deadline = time.monotonic() + 10
    while True:
        try:
            decision = await limiter.hit("login:192.0.2.1", RULES)
            break
        except LimiterUnavailable:
            assert time.monotonic() < deadline, "FailClosedLimiter never reached Redis again"
            await asyncio.sleep(0.1)
    assert decision.rule("minute").remaining == 4  # the restarted Redis started empty


async def test_a_hung_redis_costs_one_deadline_not_one_per_request(hung_redis_url: str) -> None:
    client = gateway_like_client(hung_redis_url)  # its own socket timeout is 2 s
    inference = FallbackLimiter(
        RedisLimiter(client, timeout_s=0.3), LocalLimiter(), warn_interval_s=60
    )
    strict = FailClosedLimiter(RedisLimiter(client, timeout_s=0.3))
    try:
        started = time.monotonic()
        assert (await inference.hit("k", RULES)).allowed
        # The limiter's deadline (0.3 s), not the client's 2 s socket timeout.
        assert 0.3 <= time.monotonic() - started < 1.5
        assert inference.degraded
        started = time.monotonic()
        later = [await inference.hit("k", RULES) for _ in range(20)]
        # Until the next probe (1 s) calls go straight to the local limiter: all 20 together
        # take less than one Redis deadline, so none of them waited for Redis.
        assert time.monotonic() - started < 0.3
        assert sum(d.allowed for d in later) == 4
        started = time.monotonic()
        with pytest.raises(LimiterUnavailable):
            await strict.hit("login:k", RULES)
        assert 0.3 <= time.monotonic() - started < 1.5
    finally:
        await client.aclose()
