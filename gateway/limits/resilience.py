"""What happens when Redis is down: inference falls back per process, login and admin fail
closed."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

import redis.exceptions
import structlog

from gateway.limits.base import Decision, Limiter, LimiterUnavailable
from gateway.limits.local import LocalLimiter
from gateway.limits.rules import Rule

T = TypeVar("T")

# Redis unreachable or too slow. OSError covers refused connections and the builtin
# TimeoutError that RedisLimiter's own deadline raises.
REDIS_DOWN: tuple[type[BaseException], ...] = (
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
    OSError,
)


class FallbackLimiter:
    """Redis first; while Redis is unreachable, the in-process limiter for each call.

    Inference stays bounded per process during an outage (each process enforces the full limit
    on its own). Each fallback call increments ``fallback_count`` and calls ``on_fallback``
    (a metric); a warning is logged at most once per ``warn_interval_s``. While degraded, Redis
    is retried at most once per ``probe_interval_s`` (other calls go straight to the local
    limiter, so an unreachable Redis does not add latency to every request); the first answer
    ends the degraded state.
    """

    def __init__(
        self,
        primary: Limiter,
        fallback: LocalLimiter,
        warn_interval_s: float,
        on_fallback: Callable[[], None] | None = None,
        *,
        probe_interval_s: float = 1.0,
    ) -> None:
        """Wrap ``primary`` (a RedisLimiter) with ``fallback`` for outages."""
        self.primary = primary
        self.fallback = fallback
        self._warn_interval_s = warn_interval_s
        self._on_fallback = on_fallback
        self._probe_interval_s = probe_interval_s
        self._next_probe = 0.0
        self._last_warning: float | None = None
        self.fallback_count = 0
        self.degraded = False

    async def _call(self, use: Callable[[Limiter], Awaitable[T]], operation: str) -> T:
        now = time.monotonic()
        if self.degraded and now < self._next_probe:
            return await self._fall_back(use, operation, None)
        # Claimed before awaiting: concurrent calls during this probe go local.
        self._next_probe = now + self._probe_interval_s
        try:
            result = await use(self.primary)
        except REDIS_DOWN as exc:
            self.degraded = True
            self._next_probe = time.monotonic() + self._probe_interval_s
            return await self._fall_back(use, operation, exc)
        if self.degraded:
            self.degraded = False
            structlog.get_logger(__name__).info(
                "rate_limiter_recovered", fallback_count=self.fallback_count
            )
        return result

    async def _fall_back(
        self, use: Callable[[Limiter], Awaitable[T]], operation: str, exc: BaseException | None
    ) -> T:
        self.fallback_count += 1
        if self._on_fallback is not None:
            self._on_fallback()
        now = time.monotonic()
        if self._last_warning is None or now - self._last_warning >= self._warn_interval_s:
            self._last_warning = now
            # A fresh logger each time: warnings are rare, and no cached logger outlives a
            # logging reconfiguration.
            structlog.get_logger(__name__).warning(
                "rate_limiter_degraded",
                detail="Redis unreachable: rate limits are enforced per process",
                operation=operation,
                error=type(exc).__name__ if exc is not None else "circuit_open",
                fallback_count=self.fallback_count,
            )
        return await use(self.fallback)

    async def hit(self, key: str, rules: Sequence[Rule], cost: int = 1) -> Decision:
        """``hit`` on Redis, or on the local limiter while Redis is down."""
        return await self._call(lambda limiter: limiter.hit(key, rules, cost), "hit")

    async def peek(self, key: str, rules: Sequence[Rule], cost: int = 1) -> Decision:
        """``peek`` on Redis, or on the local limiter while Redis is down."""
        return await self._call(lambda limiter: limiter.peek(key, rules, cost), "peek")

    async def gated_hit(
        self, key: str, gate: Sequence[Rule], rules: Sequence[Rule], cost: int = 1
    ) -> tuple[Decision, Decision]:
        """``gated_hit`` on Redis, or on the local limiter while Redis is down."""
        return await self._call(lambda limiter: limiter.gated_hit(key, gate, rules, cost), "hit")

    async def add(self, key: str, rules: Sequence[Rule], amount: int) -> None:
        """``add`` on Redis, or on the local limiter while Redis is down."""
        await self._call(lambda limiter: limiter.add(key, rules, amount), "add")

    async def ping(self) -> None:
        """Ping Redis (raises while it is down, so readiness can report it)."""
        await self.primary.ping()


class FailClosedLimiter:
    """For login, refresh, logout and admin routes: if Redis cannot be asked, refuse
    (LimiterUnavailable → 503) rather than open a brute-force window."""

    def __init__(self, primary: Limiter) -> None:
        """Wrap ``primary`` (a RedisLimiter)."""
        self.primary = primary

    async def _call(self, call: Awaitable[T]) -> T:
        try:
            return await call
        except REDIS_DOWN as exc:
            raise LimiterUnavailable() from exc

    async def hit(self, key: str, rules: Sequence[Rule], cost: int = 1) -> Decision:
        """``hit`` on Redis; LimiterUnavailable when Redis is down."""
        return await self._call(self.primary.hit(key, rules, cost))

    async def peek(self, key: str, rules: Sequence[Rule], cost: int = 1) -> Decision:
        """``peek`` on Redis; LimiterUnavailable when Redis is down."""
        return await self._call(self.primary.peek(key, rules, cost))

    async def gated_hit(
        self, key: str, gate: Sequence[Rule], rules: Sequence[Rule], cost: int = 1
    ) -> tuple[Decision, Decision]:
        """``gated_hit`` on Redis; LimiterUnavailable when Redis is down."""
        return await self._call(self.primary.gated_hit(key, gate, rules, cost))

    async def add(self, key: str, rules: Sequence[Rule], amount: int) -> None:
        """``add`` on Redis; LimiterUnavailable when Redis is down."""
        await self._call(self.primary.add(key, rules, amount))

    async def ping(self) -> None:
        """Ping Redis; LimiterUnavailable when Redis is down."""
        await self._call(self.primary.ping())
