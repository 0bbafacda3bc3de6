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


def count_rate_limited(tier: str, limit: str) -> None:
    """A 429: `tier` is the caller's tier ("anonymous" per IP, "none" for login)."""
    child = _rate_limited.get((tier, limit))
    if child is None:
        child = RATE_LIMITED.labels(
            tier=tier if tier in _TIERS else OTHER, limit=limit if limit in _LIMITS else OTHER
        )
        if len(_rate_limited) < MAX_CACHED:
            _rate_limited[(tier, limit)] = child
    child.inc()


def count_auth_failure(code: str | None) -> None:
    """A refused credential; `code` is the error code the gateway answered with."""
    reason = code or "none"
    child = _auth_failures.get(reason)
    if child is None:
        label = reason if _CODE_SHAPE.match(reason) and len(_auth_failures) < 64 else OTHER
        child = AUTH_FAILURES.labels(reason=label)
        if label != OTHER:
            _auth_failures[reason] = child
    child.inc()


def count_limiter_fallback() -> None:
    """One decision was made locally while Redis was down."""
    RATE_LIMITER_FALLBACK.inc()
