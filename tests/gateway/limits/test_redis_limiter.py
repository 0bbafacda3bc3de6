"""RedisLimiter specifics: one limit shared by several processes, atomicity, keys and clock."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from redis.asyncio import Redis

from gateway.limits import RedisLimiter, Rule
from tests.helpers.redis_clients import gateway_like_client

pytestmark = pytest.mark.redis


@pytest.fixture
async def second_client(redis_url: str) -> AsyncIterator[Redis]:
    """Another client on the same Redis: stands for a second gateway process."""
    client = gateway_like_client(redis_url)
    try:
        yield client
    finally:
        await client.aclose()


async def test_two_processes_share_one_limit(redis_client: Redis, second_client: Redis) -> None:
    rules = (Rule("minute", 10, 60),)
    first, second = RedisLimiter(redis_client), RedisLimiter(second_client)
    decisions = await asyncio.gather(
        *(limiter.hit("user:7", rules) for limiter in (first, second) for _ in range(8))
    )
    assert sum(d.allowed for d in decisions) == 10
    assert sorted(d.rule("minute").remaining for d in decisions if d.allowed) == list(range(10))
    for limiter in (first, second):
        assert not (await limiter.peek("user:7", rules)).allowed


async def test_concurrent_hits_are_atomic(redis_client: Redis, second_client: Redis) -> None:
    rules = (Rule("minute", 20, 60), Rule("hour", 1000, 3600))
    limiters = [RedisLimiter(redis_client), RedisLimiter(second_client)]
    decisions = await asyncio.gather(*(limiters[i % 2].hit("k", rules) for i in range(50)))
    assert sum(d.allowed for d in decisions) == 20
    # The denied 30 counted nothing, in either rule.
    after = await limiters[0].peek("k", rules)
    assert after.rule("hour").remaining == 1000 - 20


async def test_keys_are_prefixed_per_rule_and_expire(redis_client: Redis) -> None:
    limiter = RedisLimiter(redis_client, prefix="test-rl:")
    rules = (Rule("minute", 5, 60), Rule("tokens-minute", 100, 60))
    assert limiter.keys("user:1", rules) == [
        "test-rl:user:1:minute",
        "test-rl:user:1:tokens-minute",
    ]
    await limiter.hit("user:1", rules, cost=2)
    assert sorted(await redis_client.keys("*")) == [
        b"test-rl:user:1:minute",
        b"test-rl:user:1:tokens-minute",
    ]
    # Each key lives exactly until its budget is full again: 2 * 12 s and 2 * 0.6 s.
    assert 23_000 < await redis_client.pttl("test-rl:user:1:minute") <= 24_000
    assert 0 < await redis_client.pttl("test-rl:user:1:tokens-minute") <= 1_200
    await limiter.peek("other", rules)  # peeking writes nothing
    assert await redis_client.exists("test-rl:other:minute") == 0


async def test_state_is_on_the_redis_server_clock(redis_client: Redis) -> None:
    limiter = RedisLimiter(redis_client)
    rules = (Rule("minute", 5, 60),)
    seconds, micros = await redis_client.time()
    await limiter.hit("k", rules)
    stored = int(await redis_client.get("rl:k:minute"))
    after_seconds, after_micros = await redis_client.time()
    # The stored TAT is the server's TIME at the call plus one 12 s interval, in microseconds.
    assert seconds * 1_000_000 + micros + 12_000_000 <= stored
    assert stored <= after_seconds * 1_000_000 + after_micros + 12_000_000


async def test_the_script_survives_a_script_flush(redis_client: Redis) -> None:
    limiter = RedisLimiter(redis_client)
    rules = (Rule("minute", 5, 60),)
    await limiter.hit("k", rules)
    await redis_client.script_flush()  # as after a Redis restart or failover
    assert (await limiter.hit("k", rules)).rule("minute").remaining == 3
    await limiter.ping()
