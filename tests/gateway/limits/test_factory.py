"""build_limiters: local without Redis; fallback for inference and fail-closed for login with."""

from __future__ import annotations

import pytest
from redis.asyncio import Redis

from gateway.limits import (
    FailClosedLimiter,
    FallbackLimiter,
    LimiterUnavailable,
    LocalLimiter,
    Rule,
    build_limiters,
)
from tests.helpers.app import make_settings
from tests.helpers.ports import free_port
from tests.helpers.redis_clients import gateway_like_client

RULES = (Rule("minute", 3, 60),)


async def test_without_redis_both_limiters_are_one_local_limiter() -> None:
    limiters = build_limiters(make_settings(), None)
    assert isinstance(limiters.inference, LocalLimiter)
    assert limiters.strict is limiters.inference
    assert limiters.fallback is None
    await limiters.inference.hit("k", RULES)
    assert (await limiters.strict.hit("k", RULES)).rule("minute").remaining == 1


@pytest.mark.redis
async def test_with_redis_both_share_the_redis_state(redis_client: Redis) -> None:
    limiters = build_limiters(make_settings(), redis_client, prefix="gw:")
    assert isinstance(limiters.inference, FallbackLimiter)
    assert isinstance(limiters.strict, FailClosedLimiter)
    assert limiters.fallback is limiters.inference
    await limiters.inference.hit("k", RULES)
    assert (await limiters.strict.hit("k", RULES)).rule("minute").remaining == 1
    assert await redis_client.exists("gw:k:minute") == 1


async def test_with_redis_down_inference_degrades_and_strict_refuses() -> None:
    closed = gateway_like_client(f"redis://127.0.0.1:{free_port()}/0")
    fallbacks: list[int] = []
    settings = make_settings(LIMITER_FALLBACK_WARN_INTERVAL_S=5)
    limiters = build_limiters(settings, closed, on_fallback=lambda: fallbacks.append(1))
    try:
        assert (await limiters.inference.hit("k", RULES)).allowed
        assert limiters.fallback is not None
        assert limiters.fallback.degraded
        assert fallbacks == [1]
        with pytest.raises(LimiterUnavailable):
            await limiters.strict.hit("login:k", RULES)
    finally:
        await closed.aclose()
