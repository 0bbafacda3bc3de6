"""One behaviour, two stores: every test here runs on RedisLimiter and on LocalLimiter."""

from __future__ import annotations

import asyncio

import pytest

from gateway.limits import Limiter, Rule

MINUTE_5 = (Rule("minute", 5, 60),)


async def test_allows_the_limit_then_denies_with_retry_after(limiter: Limiter) -> None:
    decisions = [await limiter.hit("user:1", MINUTE_5) for _ in range(5)]
    assert [d.allowed for d in decisions] == [True] * 5
    assert [d.rule("minute").remaining for d in decisions] == [4, 3, 2, 1, 0]
    assert all(d.retry_after_s == 0 for d in decisions)

    denied = await limiter.hit("user:1", MINUTE_5)
    assert not denied.allowed
    # One unit refills every 60 s / 5 = 12 s: the next one fits 12 s after the 5th hit.
    assert denied.retry_after_s == 12
    assert denied.rule("minute").remaining == 0
    assert denied.rule("minute").reset_s == 60
    assert denied.headers()["Retry-After"] == "12"
    # Other keys are untouched.
    assert (await limiter.hit("user:2", MINUTE_5)).rule("minute").remaining == 4


async def test_a_denied_call_consumes_nothing(limiter: Limiter) -> None:
    rules = (Rule("minute", 10, 60), Rule("hour", 2, 3600))
    assert [(await limiter.hit("k", rules)).allowed for _ in range(7)] == [True] * 2 + [False] * 5
    state = await limiter.peek("k", rules)
    # Only the two allowed hits were counted in the minute rule, not the five denied ones.
    assert state.rule("minute").remaining == 8
    assert state.rule("hour").remaining == 0
    assert state.retry_after_s == 1800  # the hour rule refills one unit per 3600 / 2 s


async def test_the_tighter_rule_denies(limiter: Limiter) -> None:
    rules = (Rule("minute", 3, 60), Rule("hour", 100, 3600))
    assert [(await limiter.hit("k", rules)).allowed for _ in range(4)] == [True] * 3 + [False]
    denied = await limiter.peek("k", rules)
    assert not denied.allowed
    assert denied.retry_after_s == 20
    assert (denied.rule("minute").remaining, denied.rule("hour").remaining) == (0, 97)


async def test_costs_above_one(limiter: Limiter) -> None:
    rules = (Rule("minute", 10, 60),)
    assert (await limiter.hit("k", rules, cost=4)).rule("minute").remaining == 6
    assert (await limiter.hit("k", rules, cost=4)).rule("minute").remaining == 2
    too_much = await limiter.hit("k", rules, cost=4)
    assert not too_much.allowed
    assert too_much.retry_after_s == 12  # two more units (6 s each) must refill
    assert too_much.rule("minute").remaining == 2
    exact = await limiter.hit("k", rules, cost=2)
    assert exact.allowed
    assert exact.rule("minute").remaining == 0


async def test_a_cost_above_the_limit_is_never_allowed(limiter: Limiter) -> None:
    rules = (Rule("minute", 10, 60),)
    denied = await limiter.hit("k", rules, cost=11)
    assert not denied.allowed
    assert denied.retry_after_s == 60
    assert (await limiter.peek("k", rules)).rule("minute").remaining == 10


async def test_add_past_the_limit_then_peek_denies(limiter: Limiter) -> None:
    tokens = (Rule("tokens-minute", 100, 60),)
    assert (await limiter.peek("k", tokens)).allowed
    await limiter.add("k", tokens, 150)  # a finished stream used more than was left
    first = await limiter.peek("k", tokens)
    second = await limiter.peek("k", tokens)
    assert not first.allowed
    assert first == second  # peeking counts nothing
    assert first.rule("tokens-minute").remaining == 0
    # 150 tokens at 0.6 s each: full again after 90 s; one token fits after 90.6 - 60 s.
    assert first.rule("tokens-minute").reset_s == 90
    assert first.retry_after_s == 31
    assert first.headers()["X-RateLimit-Remaining-Tokens-Minute"] == "0"
    assert not (await limiter.hit("k", tokens)).allowed


async def test_peek_counts_nothing_and_add_counts(limiter: Limiter) -> None:
    rules = (Rule("minute", 3, 60),)
    peeks = [await limiter.peek("k", rules) for _ in range(5)]
    assert all(p.allowed and p.rule("minute").remaining == 3 for p in peeks)
    assert not (await limiter.peek("k", rules, cost=4)).allowed
    await limiter.add("k", rules, 0)  # nothing to count
    await limiter.add("k", rules, 1)
    assert (await limiter.hit("k", rules)).rule("minute").remaining == 1


async def test_the_window_slides(limiter: Limiter) -> None:
    rules = (Rule("second", 2, 1),)
    assert [(await limiter.hit("k", rules)).allowed for _ in range(3)] == [True, True, False]
    assert (await limiter.peek("k", rules)).retry_after_s == 1
    await asyncio.sleep(0.6)  # one unit refills every 0.5 s
    refilled = [await limiter.hit("k", rules) for _ in range(2)]
    assert [d.allowed for d in refilled] == [True, False]
    await asyncio.sleep(1.05)  # a whole window without calls: the budget is full again
    full = await limiter.peek("k", rules)
    assert full.rule("second").remaining == 2
    assert full.rule("second").reset_s == 0


async def test_no_rules_means_unlimited(limiter: Limiter) -> None:
    for _ in range(3):
        decision = await limiter.hit("k", ())
        assert decision.allowed
        assert decision.headers() == {}
    await limiter.add("k", (), 10)
    assert (await limiter.peek("k", ())).allowed


async def test_invalid_calls_are_refused(limiter: Limiter) -> None:
    rules = (Rule("minute", 3, 60),)
    with pytest.raises(ValueError, match="cost"):
        await limiter.hit("k", rules, cost=0)
    with pytest.raises(ValueError, match="cost"):
        await limiter.add("k", rules, -1)
    with pytest.raises(ValueError, match="duplicate"):
        await limiter.hit("k", (Rule("minute", 3, 60), Rule("minute", 5, 60)))
    assert (await limiter.peek("k", rules)).rule("minute").remaining == 3
