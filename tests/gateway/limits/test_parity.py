"""RedisLimiter and LocalLimiter give the same decisions for the same sequence of calls."""

from __future__ import annotations

import pytest
from redis.asyncio import Redis

from gateway.limits import Decision, Limiter, LocalLimiter, RedisLimiter, Rule

pytestmark = pytest.mark.redis

REQUESTS = (Rule("minute", 4, 60), Rule("hour", 6, 3600))
TOKENS = (Rule("tokens-minute", 1000, 60),)


async def _script(limiter: Limiter) -> list[Decision]:
    """A mixed sequence: hits over two rules, costs, peeks, token adds past the budget."""
    out: list[Decision] = []
    for key in ("a", "b"):
        for _ in range(5):
            out.append(await limiter.hit(key, REQUESTS))
        out.append(await limiter.peek(key, REQUESTS, cost=2))
        out.append(await limiter.hit(f"{key}-cost", REQUESTS, cost=3))
        out.append(await limiter.hit(f"{key}-cost", REQUESTS, cost=2))
        out.append(await limiter.peek(key, TOKENS))
        await limiter.add(key, TOKENS, 700)
        out.append(await limiter.peek(key, TOKENS, cost=300))
        out.append(await limiter.peek(key, TOKENS, cost=301))
        await limiter.add(key, TOKENS, 700)
        out.append(await limiter.peek(key, TOKENS))
        out.append(await limiter.hit(key, TOKENS, cost=1001))
    return out


async def test_same_calls_same_decisions(redis_client: Redis) -> None:
    on_redis = await _script(RedisLimiter(redis_client))
    on_local = await _script(LocalLimiter())
    assert on_redis == on_local
    # The sequence exercises both outcomes and more than one retry time.
    assert {d.allowed for d in on_redis} == {True, False}
    assert len({d.retry_after_s for d in on_redis if not d.allowed}) >= 3
