"""Requests per minute per API key, by the key's tier, with X-RateLimit-* headers on every
answer; shared through Redis by every gateway process."""

from __future__ import annotations

import asyncio

import httpx
import openai
import pytest

from gateway.settings import Settings
from tests.helpers.quota import (
    HELLO,
    Gateway,
    bearer,
    chat,
    create_key,
    error_code,
    quota_gateway,
    quota_settings,
    remaining,
    sse_events,
)

pytestmark = pytest.mark.postgres


def _assert_limited(response: httpx.Response, limit: int) -> None:
    assert response.status_code == 429, response.text
    assert error_code(response) == "rate_limit_exceeded"
    assert response.json()["error"]["type"] == "rate_limit_error"
    # GCRA: after a burst of `limit`, one more fits every 60/limit seconds.
    assert 1 <= int(response.headers["Retry-After"]) <= 60 // limit + 1
    assert response.headers["X-RateLimit-Limit-Minute"] == str(limit)
    assert remaining(response) == 0


async def _engine_requests(gw: Gateway) -> int:
    return int((await gw.sim_stats())["requests_total"])


async def test_free_tier_gets_its_per_minute_limit_per_key(pg_url: str) -> None:
    settings = quota_settings(
        pg_url,
        RATE_LIMIT_FREE_PER_MINUTE=3,
        RATE_LIMIT_FREE_PER_HOUR=50,
        RATE_LIMIT_PREMIUM_PER_MINUTE=100,
        RATE_LIMIT_PREMIUM_PER_HOUR=500,
    )
    async with quota_gateway(settings) as gw:
        http = gw.http
        free = bearer((await create_key(http, "free-team", tier="free"))["key"])
        other_free = bearer((await create_key(http, "free-team", tier="free"))["key"])
        premium = bearer((await create_key(http, "rich-team", tier="premium"))["key"])
        before = await _engine_requests(gw)

        first = await chat(http, free)
        streamed = await chat(http, free, stream=True)
        third = await chat(http, free, model="current")
        for reply in (first, streamed, third):
            assert reply.status_code == 200, reply.text
            assert reply.headers["X-RateLimit-Limit-Minute"] == "3"
            assert reply.headers["X-RateLimit-Limit-Hour"] == "50"
            assert "Retry-After" not in reply.headers
        assert streamed.headers["content-type"].startswith("text/event-stream")
        assert sse_events(streamed)[-1] == "[DONE]"
        assert [remaining(r) for r in (first, streamed, third)] == [2, 1, 0]
        assert [remaining(r, "Hour") for r in (first, streamed, third)] == [49, 48, 47]

        denied = await chat(http, free)
        _assert_limited(denied, 3)
        _assert_limited(await chat(http, free, stream=True), 3)
        async with openai.AsyncOpenAI(
            base_url=f"{gw.url}/v1", api_key=free["Authorization"][7:], max_retries=0
        ) as sdk:
            with pytest.raises(openai.RateLimitError) as raised:
                await sdk.chat.completions.create(model="sim-a", messages=HELLO, max_tokens=2)
            assert raised.value.code == "rate_limit_exceeded"
        # Denials reach no engine and cost nothing: the hour budget is unchanged.
        assert await _engine_requests(gw) == before + 3
        assert remaining(denied, "Hour") == 47

        # Another free key has a budget of its own.
        others = [await chat(http, other_free) for _ in range(3)]
        assert [r.status_code for r in others] == [200, 200, 200]
        assert [remaining(r) for r in others] == [2, 1, 0]
        _assert_limited(await chat(http, other_free), 3)

        # Premium keys are not touched by the free tier's limit.
        rich = [await chat(http, premium, stream=n % 2 == 1) for n in range(8)]
        assert [r.status_code for r in rich] == [200] * 8
        assert {r.headers["X-RateLimit-Limit-Minute"] for r in rich} == {"100"}
        # (Counted on the hour rule: it refills one request per 7.2 s, the minute's per 0.6 s.)
        assert [remaining(r, "Hour") for r in rich] == list(range(499, 491, -1))
        # And the first free key is still refused.
        _assert_limited(await chat(http, free), 3)


@pytest.mark.redis
async def test_a_limit_holds_across_gateway_processes_sharing_redis(
    pg_url: str, redis_url: str
) -> None:
    def settings() -> Settings:
        return quota_settings(pg_url, REDIS_URL=redis_url, RATE_LIMIT_FREE_PER_MINUTE=4)

    async with (
        quota_gateway(settings()) as one,
        quota_gateway(settings()) as two,
    ):
        assert one.url != two.url
        assert await one.wait_ready() != await two.wait_ready()  # one engine each
        key = bearer((await create_key(one.http, "shared", tier="free"))["key"])
        replies = [await chat(gw.http, key) for gw in (one, two, one, two)]
        assert [r.status_code for r in replies] == [200] * 4
        assert [remaining(r) for r in replies] == [3, 2, 1, 0]
        # Either process refuses the fifth, also when both are asked at once.
        both = await asyncio.gather(chat(one.http, key), chat(two.http, key))
        for reply in both:
            _assert_limited(reply, 4)
        # Exactly four requests were served, two by each process's engine.
        assert [await _engine_requests(gw) for gw in (one, two)] == [2, 2]
