"""gated_hit: the token budget gates the request count, in one atomic call (one Redis round trip).

The semantics tests run on RedisLimiter and on LocalLimiter (the ``limiter`` fixture).
"""

from __future__ import annotations

import uuid

import pytest
from redis.asyncio import Redis
from starlette.requests import Request

from gateway.errors import GatewayError
from gateway.limits import Decision, Limiter, LocalLimiter, RedisLimiter, Rule
from gateway.limits.base import ALLOW_UNLIMITED
from gateway.limits.enforce import check_inference
from gateway.limits.rules import tier_rules
from gateway.principal import Principal
from tests.helpers.app import make_settings

TOKENS = (Rule("tokens-minute", 100, 60),)
REQUESTS = (Rule("minute", 3, 60), Rule("hour", 10, 3600))


async def test_an_open_gate_counts_the_request_and_only_the_request(limiter: Limiter) -> None:
    budget, decision = await limiter.gated_hit("k", TOKENS, REQUESTS)
    assert budget.allowed
    assert decision.allowed
    assert budget.rule("tokens-minute").remaining == 100  # peeked, not spent
    assert decision.rule("minute").remaining == 2
    assert decision.rule("hour").remaining == 9
    assert (await limiter.peek("k", TOKENS)).rule("tokens-minute").remaining == 100
    assert (await limiter.peek("k", REQUESTS)).rule("minute").remaining == 2


async def test_a_closed_gate_counts_nothing(limiter: Limiter) -> None:
    await limiter.hit("k", REQUESTS)
    await limiter.add("k", TOKENS, 130)  # 30 tokens past the budget
    budget, decision = await limiter.gated_hit("k", TOKENS, REQUESTS)
    assert not budget.allowed
    # 31 tokens must refill (0.6 s each) before one more fits.
    assert budget.retry_after_s == 19
    assert budget.headers()["Retry-After"] == "19"
    # The request rules were only looked at: what a peek says, nothing spent.
    assert decision == await limiter.peek("k", REQUESTS)
    assert decision.rule("minute").remaining == 2


async def test_the_request_rules_deny_behind_an_open_gate(limiter: Limiter) -> None:
    outcomes = [await limiter.gated_hit("k", TOKENS, REQUESTS) for _ in range(4)]
    assert [(b.allowed, d.allowed) for b, d in outcomes] == [(True, True)] * 3 + [(True, False)]
    denied = outcomes[-1][1]
    assert denied.retry_after_s == 20
    assert (await limiter.peek("k", REQUESTS)).rule("hour").remaining == 7  # the denial is free


async def test_empty_gate_or_rules(limiter: Limiter) -> None:
    budget, decision = await limiter.gated_hit("k", (), REQUESTS)
    assert budget == ALLOW_UNLIMITED
    assert decision.rule("minute").remaining == 2
    budget, decision = await limiter.gated_hit("k", TOKENS, ())
    assert budget.rule("tokens-minute").remaining == 100
    assert decision == ALLOW_UNLIMITED
    assert await limiter.gated_hit("k", (), ()) == (ALLOW_UNLIMITED, ALLOW_UNLIMITED)


async def test_gate_and_rules_share_one_namespace(limiter: Limiter) -> None:
    with pytest.raises(ValueError, match="duplicate"):
        await limiter.gated_hit("k", (Rule("minute", 5, 60),), REQUESTS)


async def _mixed(limiter: Limiter) -> list[Decision]:
    """Gated hits through both denials, interleaved with the other calls."""
    out: list[Decision] = []
    for _ in range(4):
        out += await limiter.gated_hit("a", TOKENS, REQUESTS)
    await limiter.add("a", TOKENS, 99)
    out += await limiter.gated_hit("a", TOKENS, REQUESTS, cost=2)
    await limiter.add("a", TOKENS, 5)
    out += await limiter.gated_hit("a", TOKENS, REQUESTS)
    out.append(await limiter.peek("a", REQUESTS))
    out += await limiter.gated_hit("b", TOKENS, REQUESTS, cost=3)
    return out


@pytest.mark.redis
async def test_redis_and_local_agree(redis_client: Redis) -> None:
    on_redis = await _mixed(RedisLimiter(redis_client))
    on_local = await _mixed(LocalLimiter())
    assert on_redis == on_local
    assert {d.allowed for d in on_redis} == {True, False}


async def _evalsha_calls(redis: Redis) -> int:
    stats = await redis.info("commandstats")
    return int(stats.get("cmdstat_evalsha", {}).get("calls", 0))


@pytest.mark.redis
async def test_one_script_call_per_inference_check(redis_client: Redis) -> None:
    # The standard tier: requests per minute and per hour, and a token budget (the default).
    settings = make_settings(RATE_LIMIT_STANDARD_TOKENS_PER_MINUTE=1000)
    per_minute = settings.RATE_LIMIT_STANDARD_PER_MINUTE
    rules = tier_rules(settings, "standard")
    limiter = RedisLimiter(redis_client)
    user = uuid.uuid4()
    principal = Principal(user_id=user, username="u", role="user", tier="standard", via="jwt")
    request = Request({"type": "http", "client": ("192.0.2.7", 4000), "headers": []})

    async def check() -> dict[str, str]:
        _, tokens, headers = await check_inference(
            limiter=limiter, settings=settings, principal=principal, request=request
        )
        assert tokens == rules.tokens
        return headers

    await check()  # loads the script (a first EVALSHA may answer NOSCRIPT)
    before = await _evalsha_calls(redis_client)
    headers = [await check() for _ in range(5)]
    assert await _evalsha_calls(redis_client) - before == 5
    assert headers[-1]["X-RateLimit-Remaining-Minute"] == str(per_minute - 6)
    assert headers[-1]["X-RateLimit-Remaining-Tokens-Minute"] == "1000"

    # A refusal for tokens is one call too, and spends no request.
    await limiter.add(f"user:{user}", rules.tokens, 1000)
    before = await _evalsha_calls(redis_client)
    with pytest.raises(GatewayError) as refused:
        await check()
    assert await _evalsha_calls(redis_client) - before == 1
    assert refused.value.status_code == 429
    assert refused.value.code == "token_rate_limit_exceeded"
    left = await limiter.peek(f"user:{user}", rules.requests)
    assert left.rule("minute").remaining == per_minute - 6
