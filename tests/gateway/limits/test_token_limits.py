"""Tokens per minute from the usage engines report, counted when a response finishes (a
stream's at its end), checked before the next request."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from redis.asyncio import Redis

from gateway.limits.base import Decision
from gateway.limits.ledger import TokenLedger
from gateway.limits.rules import tier_rules
from tests.helpers.polling import eventually
from tests.helpers.quota import (
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

BUDGET = 60
GENERATED = 40  # per request: one fits the budget, two do not
# The budget refills one token a second; this many seconds of test time are allowed for.
SLACK = 8


async def test_usage_of_finished_requests_streams_included_spends_the_token_budget(
    pg_url: str,
) -> None:
    settings = quota_settings(
        pg_url,
        RATE_LIMIT_FREE_PER_MINUTE=100,
        RATE_LIMIT_FREE_PER_HOUR=100,
        RATE_LIMIT_FREE_TOKENS_PER_MINUTE=BUDGET,
    )
    async with quota_gateway(settings) as gw:
        http = gw.http
        created = await create_key(http, "tokens-team", tier="free")
        key = bearer(created["key"])
        limiter = gw.app.state.resources.limiters.inference
        rules = tier_rules(settings, "free").tokens

        async def budget() -> Decision:
            decision: Decision = await limiter.peek(f"key:{created['id']}", rules)
            return decision

        async def left_at_most(tokens: int) -> Any:
            return (await budget()).rule("tokens-minute").remaining <= tokens

        first = await chat(http, key, max_tokens=GENERATED)
        assert first.status_code == 200, first.text
        assert first.headers["X-RateLimit-Limit-Tokens-Minute"] == str(BUDGET)
        assert remaining(first, "Tokens-Minute") == BUDGET
        usage = first.json()["usage"]
        assert usage["completion_tokens"] == GENERATED
        spent = usage["total_tokens"]
        assert GENERATED < spent < BUDGET
        # Counted after the response, off its path: wait for it.
        await eventually(lambda: left_at_most(BUDGET - spent + SLACK))
        assert (await budget()).allowed

        # A stream whose client did not ask for usage: the gateway asks the engine for it and
        # counts the total from the last event, which the client never sees.
        streamed = await chat(http, key, max_tokens=GENERATED, stream=True)
        assert streamed.status_code == 200, streamed.text
        assert BUDGET - spent <= remaining(streamed, "Tokens-Minute") <= BUDGET - spent + SLACK
        events = sse_events(streamed)
        assert events[-1] == "[DONE]"
        assert all("usage" not in event or event["usage"] is None for event in events[:-1])
        assert events[-2]["choices"][0]["finish_reason"] == "length"
        refused: Decision = await eventually(lambda: _refused(budget))
        # Two requests' worth of tokens over a 60-token minute: a wait of about 2*spent - 60 s.
        assert 2 * spent - BUDGET - SLACK <= refused.retry_after_s <= 2 * spent - BUDGET + 1

        denied = await chat(http, key, max_tokens=GENERATED)
        assert denied.status_code == 429, denied.text
        assert error_code(denied) == "token_rate_limit_exceeded"
        assert denied.json()["error"]["type"] == "rate_limit_error"
        assert int(denied.headers["Retry-After"]) >= 1
        assert denied.headers["X-RateLimit-Limit-Tokens-Minute"] == str(BUDGET)
        assert remaining(denied, "Tokens-Minute") == 0
        stats = await gw.sim_stats()
        assert stats["requests_total"] == 2
        # Refused for tokens, the request was not counted against the request limits either.
        hourly = await limiter.peek(f"key:{created['id']}", tier_rules(settings, "free").requests)
        assert hourly.rule("hour").remaining == 100 - 2

        # The budget is the key's: a fresh free key is not refused.
        fresh = bearer((await create_key(http, "tokens-team", tier="free"))["key"])
        assert (await chat(http, fresh, max_tokens=GENERATED)).status_code == 200


async def _refused(budget: Any) -> Decision | None:
    decision: Decision = await budget()
    return None if decision.allowed else decision


async def _evalsha_calls(redis: Redis) -> int:
    stats = await redis.info("commandstats")
    return int(stats.get("cmdstat_evalsha", {}).get("calls", 0))


@pytest.mark.redis
async def test_one_script_call_checks_a_request_and_one_adds_its_tokens(
    pg_url: str, redis_url: str
) -> None:
    settings = quota_settings(
        pg_url,
        REDIS_URL=redis_url,
        RATE_LIMIT_FREE_PER_MINUTE=100,
        RATE_LIMIT_FREE_PER_HOUR=1000,
        RATE_LIMIT_FREE_TOKENS_PER_MINUTE=10_000,
    )
    async with quota_gateway(settings) as gw:
        http = gw.http
        redis = gw.app.state.resources.redis
        ledger = gw.app.state.resources.limiters.tokens
        # The admin API call runs the same script: loaded before counting starts (the first
        # EVALSHA of a fresh Redis answers NOSCRIPT and is repeated).
        key = bearer((await create_key(http, "round-trips", tier="free"))["key"])
        before = await _evalsha_calls(redis)

        replies = [await chat(http, key, stream=n == 1) for n in range(3)]
        assert [r.status_code for r in replies] == [200] * 3
        assert [remaining(r) for r in replies] == [99, 98, 97]

        # Per request: one call checks the token budget and counts the request, atomically;
        # one more adds the tokens it spent once it has finished (off the response path).
        async def calls() -> int:
            return await _evalsha_calls(redis) - before

        await eventually(lambda: _at_least(calls, 2 * len(replies)))
        await eventually(lambda: _idle(ledger))
        assert await calls() == 2 * len(replies)


async def _idle(ledger: TokenLedger) -> bool:
    await ledger.aclose()  # applies what is queued; the ledger keeps working afterwards
    return ledger.pending == 0


async def _at_least(count: Callable[[], Awaitable[int]], expected: int) -> bool:
    return await count() >= expected
