"""Tokens per minute from the usage engines report, counted when a response finishes (a
stream's at its end), checked before the next request."""

from __future__ import annotations

from typing import Any

import pytest

from gateway.limits.base import Decision
from gateway.limits.rules import tier_rules
from tests.gateway.proxy.conftest import eventually

from .conftest import (
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
