"""Build the gateway's two limiters from settings and the (optional) Redis client."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from redis.asyncio import Redis

from gateway.limits.base import Limiter
from gateway.limits.ledger import TokenLedger
from gateway.limits.local import LocalLimiter
from gateway.limits.redis_limiter import RedisLimiter
from gateway.limits.resilience import FailClosedLimiter, FallbackLimiter
from gateway.settings import Settings


@dataclass(frozen=True)
class Limiters:
    """``inference`` degrades to per-process limits when Redis is down; ``strict`` (login,
    admin) raises LimiterUnavailable instead. ``fallback`` is the inference wrapper, for
    metrics and health (None without Redis)."""

    inference: Limiter
    strict: Limiter
    fallback: FallbackLimiter | None = None
    tokens: TokenLedger = field(init=False)

    def __post_init__(self) -> None:
        # Tokens count against the inference limiter, added off the response path.
        object.__setattr__(self, "tokens", TokenLedger(self.inference))


def build_limiters(
    settings: Settings,
    redis: Redis | None,
    *,
    on_fallback: Callable[[], None] | None = None,
    prefix: str = "rl:",
) -> Limiters:
    """Limiters over Redis when a client is given; otherwise one in-process limiter for both
    (single-process deployments without Redis)."""
    if redis is None:
        local = LocalLimiter(prefix)
        return Limiters(inference=local, strict=local)
    shared = RedisLimiter(redis, prefix)
    fallback = FallbackLimiter(
        shared,
        LocalLimiter(prefix),
        warn_interval_s=settings.LIMITER_FALLBACK_WARN_INTERVAL_S,
        on_fallback=on_fallback,
    )
    return Limiters(inference=fallback, strict=FailClosedLimiter(shared), fallback=fallback)
