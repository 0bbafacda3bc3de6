"""Cheap recorders for the request path: label children are bound once and kept in dicts.

`labels(...)` on a metric takes a lock and builds a tuple each call; on the proxy's hot path a
dict lookup on a tuple of strings the caller already has is all that is done per request. Every
cache is bounded, and every label value is checked against a closed set before it becomes one.
"""

from __future__ import annotations

import re
from typing import Any

from gateway.metrics.series import (
    AUTH_FAILURES,
    HTTP_DURATION,
    HTTP_REQUESTS,
    RATE_LIMITED,
    RATE_LIMITER_FALLBACK,
)

#: The label value for anything outside a closed set (an unknown model, method or code).
OTHER = "other"
#: The route label of a request no route matched (404s, 431s before routing).
UNMATCHED = "unmatched"

_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
_TIERS = frozenset({"free", "standard", "premium", "anonymous", "none"})
_LIMITS = frozenset({"requests", "tokens", "login", "session", "admin"})
_CODE_SHAPE = re.compile(r"^[a-z][a-z0-9_]{0,47}$")
# Caches stop growing here; past it a label is still bounded, only no longer cached.
MAX_CACHED = 512


# -- HTTP ------------------------------------------------------------------------------------


class HttpMetrics:
    """Request count and latency by route template, method and status."""

    __slots__ = ("_counts", "_durations")

    def __init__(self) -> None:
        self._counts: dict[tuple[str, str, int], Any] = {}
        self._durations: dict[tuple[str, str], Any] = {}

    def observe(self, route: str | None, method: str, status: int, seconds: float) -> None:
        """One finished request; `route` is the matched template, None when none matched."""
        key = (route or UNMATCHED, method, status)
        count = self._counts.get(key)
        if count is None:
            count = self._bind_count(key)
        count.inc()
        duration = self._durations.get(key[:2])
        if duration is None:
            duration = self._bind_duration(key[0], key[1])
        duration.observe(seconds)

    def _bind_count(self, key: tuple[str, str, int]) -> Any:
        route, method, status = key
        child = HTTP_REQUESTS.labels(
            route=route, method=method if method in _METHODS else OTHER, status=str(status)
        )
        if len(self._counts) < MAX_CACHED:
            self._counts[key] = child
        return child

    def _bind_duration(self, route: str, method: str) -> Any:
        child = HTTP_DURATION.labels(route=route, method=method if method in _METHODS else OTHER)
        if len(self._durations) < MAX_CACHED:
            self._durations[(route, method)] = child
        return child


HTTP = HttpMetrics()


# -- identity and limits ---------------------------------------------------------------------

_rate_limited: dict[tuple[str, str], Any] = {}
_auth_failures: dict[str, Any] = {}


#: The codes of refused credentials (401/403 from the caller checks and /metrics): their series
#: exist at 0 from startup.
AUTH_FAILURE_REASONS = (
    "missing_credentials",
    "invalid_credentials",
    "invalid_api_key",
    "invalid_token",
    "admin_required",
    "admin_disabled",
    "invalid_metrics_token",
    "metrics_loopback_only",
)
#: Which limits refuse whom: tiers (and anonymous callers, per IP) hit the request and token
#: limits; the per-IP and per-caller limits of login, sessions and the admin API have no tier.
RATE_LIMIT_LABELS = (
    *(
        (tier, limit)
        for tier in ("free", "standard", "premium", "anonymous")
        for limit in ("requests", "tokens")
    ),
    ("none", "login"),
    ("none", "session"),
    ("none", "admin"),
)


def _rate_limited_child(tier: str, limit: str) -> Any:
    child = _rate_limited.get((tier, limit))
    if child is None:
        child = RATE_LIMITED.labels(
            tier=tier if tier in _TIERS else OTHER, limit=limit if limit in _LIMITS else OTHER
        )
        if len(_rate_limited) < MAX_CACHED:
            _rate_limited[(tier, limit)] = child
    return child


def count_rate_limited(tier: str, limit: str) -> None:
    """A 429: `tier` is the caller's tier ("anonymous" per IP, "none" for login)."""
    _rate_limited_child(tier, limit).inc()


def _auth_failure_child(reason: str) -> Any:
    child = _auth_failures.get(reason)
    if child is None:
        label = reason if _CODE_SHAPE.match(reason) and len(_auth_failures) < 64 else OTHER
        child = AUTH_FAILURES.labels(reason=label)
        if label != OTHER:
            _auth_failures[reason] = child
    return child


def count_auth_failure(code: str | None) -> None:
    """A refused credential; `code` is the error code the gateway answered with."""
    _auth_failure_child(code or "none").inc()


def start_counters_at_zero() -> None:
    """Create the refusal counters at 0 for every known label value, so that a dashboard of a
    fresh gateway shows 0 rejections instead of "no data" (a series appears only once it has
    labels). The proxy's and the engine's series do the same for their models and profiles."""
    for tier, limit in RATE_LIMIT_LABELS:
        _rate_limited_child(tier, limit)
    for reason in AUTH_FAILURE_REASONS:
        _auth_failure_child(reason)


def count_limiter_fallback() -> None:
    """One decision was made locally while Redis was down."""
    RATE_LIMITER_FALLBACK.inc()
