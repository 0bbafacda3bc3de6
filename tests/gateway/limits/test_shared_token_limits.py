"""Tokens per minute are one budget for every gateway process sharing a Redis: tokens spent
through one process are refused by another."""

from __future__ import annotations

from typing import Any

import pytest

from gateway.limits.base import Decision
from gateway.limits.rules import tier_rules
from gateway.settings import Settings
from tests.helpers.polling import eventually
from tests.helpers.quota import (
    Gateway,
    bearer,
    chat,
    create_key,
    error_code,
    quota_gateway,
    quota_settings,
    remaining,
)

pytestmark = [pytest.mark.postgres, pytest.mark.redis]

BUDGET = 60
GENERATED = 40  # per request: one fits the budget, two do not
# The budget refills one token a second; this many seconds of test time are allowed for.
SLACK = 8


async def _budget(gw: Gateway, key_id: str) -> Decision:
    """The key's token budget as this process's limiter sees it (peek: spends nothing)."""
    rules = tier_rules(gw.app.state.settings, "free").tokens
    decision: Decision = await gw.app.state.resources.limiters.inference.peek(
        f"key:{key_id}", rules
    )
    return decision


async def _engine_requests(gw: Gateway) -> int:
    return int((await gw.sim_stats())["requests_total"])


async def test_tokens_spent_through_one_process_are_refused_by_another(
    pg_url: str, redis_url: str
) -> None:
    def settings() -> Settings:
        return quota_settings(
            pg_url,
            REDIS_URL=redis_url,
            RATE_LIMIT_FREE_PER_MINUTE=100,
            RATE_LIMIT_FREE_PER_HOUR=100,
            RATE_LIMIT_FREE_TOKENS_PER_MINUTE=BUDGET,
        )

    async with quota_gateway(settings()) as one, quota_gateway(settings()) as two:
        assert await one.wait_ready() != await two.wait_ready()  # one engine each
        created = await create_key(one.http, "shared-tokens", tier="free")
        key, key_id = bearer(created["key"]), created["id"]

        first = await chat(one.http, key, max_tokens=GENERATED)
        assert first.status_code == 200, first.text
        spent = first.json()["usage"]["total_tokens"]
        assert GENERATED < spent < BUDGET

        # Added after the response, off its path, by process one; process two sees it.
        async def two_sees_the_spend() -> Any:
            return (await _budget(two, key_id)).rule("tokens-minute").remaining <= (
                BUDGET - spent + SLACK
            )

        await eventually(two_sees_the_spend)
        second = await chat(one.http, key, max_tokens=GENERATED, stream=True)
        assert second.status_code == 200, second.text
        assert BUDGET - spent <= remaining(second, "Tokens-Minute") <= BUDGET - spent + SLACK

        async def two_refuses() -> bool:
            return not (await _budget(two, key_id)).allowed

        await eventually(two_refuses)
        denied = await chat(two.http, key, max_tokens=GENERATED)
        denied_on_one = await chat(one.http, key, max_tokens=GENERATED)
        served = [await _engine_requests(gw) for gw in (one, two)]
    for reply in (denied, denied_on_one):
        assert reply.status_code == 429, reply.text
        assert error_code(reply) == "token_rate_limit_exceeded"
        assert int(reply.headers["Retry-After"]) >= 1
        assert reply.headers["X-RateLimit-Limit-Tokens-Minute"] == str(BUDGET)
        assert remaining(reply, "Tokens-Minute") == 0
    # Process two never sent anything to its engine: the budget was spent through one.
    assert served == [2, 0]
