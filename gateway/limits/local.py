"""The in-process limiter: the same GCRA as RedisLimiter, kept in a dict, on a monotonic clock."""

from __future__ import annotations

import heapq
import time
from collections.abc import Sequence

from gateway.limits.base import ALLOW_UNLIMITED, Decision
from gateway.limits.gcra import Op, Outcome, apply, check_call, to_decision, writes
from gateway.limits.rules import MICROS_PER_S, Rule


def monotonic_us() -> int:
    """Microseconds on the monotonic clock (never jumps with the wall clock)."""
    return time.monotonic_ns() // 1000


class LocalLimiter:
    """GCRA in one process (one event loop: each call runs without awaiting, so it is atomic).

    Gives the same decisions as RedisLimiter for the same sequence of calls. Used when no Redis
    is configured, and by FallbackLimiter while Redis is down (limits then hold per process).

    Memory is bounded: entries whose budget is full again are dropped every ``sweep_interval_s``,
    and beyond ``max_keys`` the entries closest to full are dropped first (forgetting them lets
    those callers through a little early, never blocks anyone).
    """

    def __init__(
        self, prefix: str = "rl:", *, max_keys: int = 100_000, sweep_interval_s: float = 10.0
    ) -> None:
        """An empty limiter; ``max_keys`` caps the (key, rule) entries held."""
        if max_keys < 1:
            raise ValueError("max_keys must be at least 1")
        self._prefix = prefix
        self._max_keys = max_keys
        self._sweep_interval_us = int(sweep_interval_s * MICROS_PER_S)
        self._tats: dict[str, int] = {}
        self._last_sweep_us = monotonic_us()

    def __len__(self) -> int:
        """Number of (key, rule) entries held."""
        return len(self._tats)

    def _call(self, op: Op, key: str, rules: Sequence[Rule], cost: int) -> Decision:
        return to_decision(self._apply(op, key, rules, cost), rules)

    def _apply(
        self, op: Op, key: str, rules: Sequence[Rule], cost: int, now: int | None = None
    ) -> Outcome:
        if now is None:
            now = monotonic_us()
        names = [f"{self._prefix}{key}:{rule.name}" for rule in rules]
        outcome = apply(op, now, [self._tats.get(name, 0) for name in names], rules, cost)
        if writes(op, outcome):
            for name, reset_us in zip(names, outcome.reset_us, strict=True):
                self._tats[name] = now + reset_us
            self._bound(now)
        return outcome

    def _bound(self, now: int) -> None:
        """Drop expired entries now and then, and the nearest-to-full ones past max_keys."""
        if now - self._last_sweep_us >= self._sweep_interval_us or len(self._tats) > self._max_keys:
            self.sweep(now)
        excess = len(self._tats) - self._max_keys
        if excess > 0:
            # Evict a tenth more than needed so a full table is not rescanned on every new key.
            count = excess + self._max_keys // 10
            for name in heapq.nsmallest(count, self._tats, key=self._tats.__getitem__):
                del self._tats[name]

    def sweep(self, now_us: int | None = None) -> int:
        """Drop every entry whose budget is full again; returns how many were dropped."""
        now = monotonic_us() if now_us is None else now_us
        expired = [name for name, tat in self._tats.items() if tat <= now]
        for name in expired:
            del self._tats[name]
        self._last_sweep_us = now
        return len(expired)

    async def hit(self, key: str, rules: Sequence[Rule], cost: int = 1) -> Decision:
        """Check all rules and count ``cost`` in each only if all allow."""
        check_call(rules, cost, Op.HIT)
        return self._call(Op.HIT, key, rules, cost) if rules else ALLOW_UNLIMITED

    async def peek(self, key: str, rules: Sequence[Rule], cost: int = 1) -> Decision:
        """Whether ``hit`` with this cost would be allowed now; counts nothing."""
        check_call(rules, cost, Op.PEEK)
        return self._call(Op.PEEK, key, rules, cost) if rules else ALLOW_UNLIMITED

    async def gated_hit(
        self, key: str, gate: Sequence[Rule], rules: Sequence[Rule], cost: int = 1
    ) -> tuple[Decision, Decision]:
        """Peek ``gate`` and, only if it allows, hit ``rules`` (atomic: nothing awaits)."""
        check_call((*gate, *rules), cost, Op.HIT)
        # One clock reading for both, as the Lua script reads TIME once.
        now = monotonic_us()
        opened = self._apply(Op.PEEK, key, gate, cost, now) if gate else None
        if not rules:
            counted = ALLOW_UNLIMITED
        else:
            op = Op.HIT if opened is None or opened.allowed else Op.PEEK
            counted = to_decision(self._apply(op, key, rules, cost, now), rules)
        return (ALLOW_UNLIMITED if opened is None else to_decision(opened, gate)), counted

    async def add(self, key: str, rules: Sequence[Rule], amount: int) -> None:
        """Count ``amount`` in every rule, even past the limit."""
        check_call(rules, amount, Op.ADD)
        if rules and amount:
            self._apply(Op.ADD, key, rules, amount)  # its decision is never read

    async def ping(self) -> None:
        """Always reachable: the state lives in this process."""
