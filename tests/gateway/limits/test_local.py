"""LocalLimiter keeps its memory bounded."""

from __future__ import annotations

import asyncio

import pytest

from gateway.limits import LocalLimiter, Rule


async def test_entries_are_dropped_once_their_budget_is_full_again() -> None:
    limiter = LocalLimiter(sweep_interval_s=0.5)
    second, minute = Rule("second", 2, 1), Rule("minute", 2, 60)
    for i in range(50):
        await limiter.hit(f"ip:{i}", (second,))
    await limiter.hit("busy", (second, minute))
    assert len(limiter) == 52
    await asyncio.sleep(1.05)
    # The next write sweeps by itself: the one-second entries are full again, the minute one
    # (30 s per unit) is not.
    await limiter.hit("new", (second,))
    assert len(limiter) == 2
    assert limiter.sweep() == 0
    assert (await limiter.peek("busy", (minute,))).rule("minute").remaining == 1


async def test_the_number_of_entries_is_capped() -> None:
    limiter = LocalLimiter(max_keys=100)
    rules = (Rule("minute", 5, 60),)
    for i in range(500):
        await limiter.hit(f"ip:{i}", rules)
        assert len(limiter) <= 100
    # The newest entries (furthest from full) are the ones kept.
    assert (await limiter.hit("ip:499", rules)).rule("minute").remaining == 3
    assert (await limiter.peek("ip:0", rules)).rule("minute").remaining == 5


def test_max_keys_must_be_positive() -> None:
    with pytest.raises(ValueError, match="max_keys"):
        LocalLimiter(max_keys=0)
