"""Prometheus series of the gateway (the scrape endpoint and the rest of the series build on
these; counters here are process-local, aggregated by Prometheus across processes)."""

from __future__ import annotations

from prometheus_client import Counter

RATE_LIMITER_FALLBACK = Counter(
    "gateway_rate_limiter_fallback_total",
    "Rate-limit decisions made by the in-process limiter because Redis was unreachable.",
)


def count_limiter_fallback() -> None:
    """One decision was made locally while Redis was down."""
    RATE_LIMITER_FALLBACK.inc()
