"""Cheap recorders for the request path: label children are bound once and kept in dicts.

`labels(...)` on a metric takes a lock and builds a tuple each call; on the proxy's hot path a
dict lookup on a tuple of strings the caller already has is all that is done per request. Every
cache is bounded, and every label value is checked against a closed set before it becomes one.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from gateway.metrics.series import (
    AUTH_FAILURES,
    HTTP_DURATION,
    HTTP_REQUESTS,
    IN_FLIGHT,
    LOCAL_SLOTS,
    MODEL_DURATION,
    MODEL_ERRORS,
    MODEL_REQUESTS,
    MODEL_TOKENS,
    MODEL_TOKENS_PER_S,
    MODEL_TTFT,
    OVERFLOW,
    QUEUE_DEPTH,
    QUEUE_WAIT,
    RATE_LIMITED,
    RATE_LIMITER_FALLBACK,
)

if TYPE_CHECKING:
    from gateway.engine import ModelControl
    from gateway.proxy.upstream import Outcome

#: The label value for anything outside a closed set (an unknown model, method or code).
OTHER = "other"
#: The route label of a request no route matched (404s, 431s before routing).
UNMATCHED = "unmatched"

_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
_TIERS = frozenset({"free", "standard", "premium", "anonymous", "none"})
_LIMITS = frozenset({"requests", "tokens", "login", "session", "admin"})
_CODE_SHAPE = re.compile(r"^[a-z][a-z0-9_]{0,47}$")
# Caches stop growing here; past it a label is still bounded, only no longer cached.
_MAX_CACHED = 512
_MAX_ENGINE_NAMES = 256


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
        if len(self._counts) < _MAX_CACHED:
            self._counts[key] = child
        return child

    def _bind_duration(self, route: str, method: str) -> Any:
        child = HTTP_DURATION.labels(route=route, method=method if method in _METHODS else OTHER)
        if len(self._durations) < _MAX_CACHED:
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
        if len(_rate_limited) < _MAX_CACHED:
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


# -- the proxy -------------------------------------------------------------------------------


class ModelNames:
    """Maps a model name to its metric label: a profile's served name (aliases fold into it),
    a configured cloud model, a name the running external engine lists, or "other"."""

    def __init__(self, control: ModelControl, cloud_names: frozenset[str]) -> None:
        self._control = control
        self._cloud = cloud_names
        self._profiles: object = None
        self._names: dict[str, str] = {}
        self._engine_names = 0

    def label(self, name: str | None) -> str:
        """The bounded label of `name` (None or "current": the active model)."""
        if not name or name == "current":
            spec = self._control.manager.spec
            name = spec.served_model_name if spec is not None else None
            if not name:
                return OTHER
        found = self._names.get(name)
        return found if found is not None else self._resolve(name)

    def _resolve(self, name: str) -> str:
        profiles = self._control.profiles
        if profiles is not self._profiles:
            # Profiles were (re)loaded: rebuild from them and the cloud names.
            self._profiles = profiles
            self._engine_names = 0
            names = {cloud: cloud for cloud in self._cloud}
            for profile in profiles.profiles.values():
                for served in profile.served_names:
                    names[served] = profile.served_model_name
            self._names = names
            if name in names:
                return names[name]
        if name in self._control.manager.status().served_names:
            # An external engine's own names: as many as that engine serves.
            if self._engine_names < _MAX_ENGINE_NAMES:
                self._engine_names += 1
                self._names[name] = name
            return name
        return OTHER


@dataclass(frozen=True)
class _ModelSeries:
    """The children of one (model, upstream) pair."""

    requests: Any
    duration: Any
    ttft: Any
    prompt_tokens: Any
    completion_tokens: Any
    tokens_per_s: Any
    model: str
    upstream: str


class ProxyMetrics:
    """Per-model series of relayed requests, plus admission (queue, slots, overflow)."""

    def __init__(self, names: ModelNames, *, max_local: int) -> None:
        self.names = names
        self._series: dict[tuple[str, str], _ModelSeries] = {}
        self._overflow: dict[str, Any] = {}  # keyed by label: bounded
        self._waits = {
            outcome: QUEUE_WAIT.labels(outcome=outcome)
            for outcome in ("admitted", "timeout", "full", "refused", "cancelled")
        }
        self._admitted_now = self._waits["admitted"]
        self.in_flight_local = IN_FLIGHT.labels(upstream="local")
        self.in_flight_cloud = IN_FLIGHT.labels(upstream="cloud")
        LOCAL_SLOTS.set(max_local)

    # -- relayed requests --------------------------------------------------------------------

    def finished(self, model: str, upstream: str, outcome: Outcome, *, stream: bool) -> None:
        """One relayed request ended (any way); `model` is the name the upstream was sent."""
        series = self._series.get((model, upstream))
        if series is None:
            series = self._bind(model, upstream)
        series.requests.inc()
        elapsed = time.perf_counter() - outcome.started
        series.duration.observe(elapsed)
        ttft = outcome.first_byte_s
        if stream and ttft is not None:
            series.ttft.observe(ttft)
        usage = outcome.usage
        if usage:
            prompt = usage.get("prompt_tokens")
            if type(prompt) is int and prompt > 0:
                series.prompt_tokens.inc(prompt)
            completion = usage.get("completion_tokens")
            if type(completion) is int and completion > 0:
                series.completion_tokens.inc(completion)
                self._speed(series, completion, elapsed, ttft if stream else None)
        if outcome.error is not None or outcome.status >= 400 or outcome.disconnected:
            MODEL_ERRORS.labels(
                model=series.model, upstream=series.upstream, reason=_error_reason(outcome)
            ).inc()

    @staticmethod
    def _speed(series: _ModelSeries, completion: int, elapsed: float, ttft: float | None) -> None:
        # Streams: tokens after the first over the time after it (decode speed); whole
        # responses: all tokens over the whole time.
        if ttft is not None:
            if completion > 1 and elapsed > ttft:
                series.tokens_per_s.observe((completion - 1) / (elapsed - ttft))
        elif elapsed > 0:
            series.tokens_per_s.observe(completion / elapsed)

    def _bind(self, model: str, upstream: str) -> _ModelSeries:
        label = self.names.label(model)
        route = upstream if upstream in ("local", "cloud") else OTHER
        series = _ModelSeries(
            requests=MODEL_REQUESTS.labels(model=label, upstream=route),
            duration=MODEL_DURATION.labels(model=label, upstream=route),
            ttft=MODEL_TTFT.labels(model=label, upstream=route),
            prompt_tokens=MODEL_TOKENS.labels(model=label, upstream=route, direction="prompt"),
            completion_tokens=MODEL_TOKENS.labels(
                model=label, upstream=route, direction="completion"
            ),
            tokens_per_s=MODEL_TOKENS_PER_S.labels(model=label, upstream=route),
            model=label,
            upstream=route,
        )
        if label != OTHER or len(self._series) < _MAX_CACHED:
            self._series[(model, upstream)] = series
        return series

    # -- admission ---------------------------------------------------------------------------

    def overflowed(self, model: str | None) -> None:
        """A request went to the cloud instead of the local engine."""
        label = self.names.label(model)
        child = self._overflow.get(label)
        if child is None:
            child = self._overflow[label] = OVERFLOW.labels(model=label)
        child.inc()

    def admitted_now(self) -> None:
        """A slot was free: no wait."""
        self._admitted_now.observe(0.0)

    def queue_entered(self) -> None:
        """A request starts waiting."""
        QUEUE_DEPTH.inc()

    def queue_left(self, outcome: str, waited_s: float) -> None:
        """A waiting request got a slot, timed out, was refused or went away."""
        QUEUE_DEPTH.dec()
        self._waits[outcome].observe(waited_s)

    def queue_full(self) -> None:
        """Refused at once: the queue was full."""
        self._waits["full"].observe(0.0)


def _error_reason(outcome: Outcome) -> str:
    """Why a relayed request failed; the reasons are a closed set."""
    if outcome.disconnected:
        return "client_disconnected"
    status = outcome.status
    if status == 200:
        return "stream_error"  # the engine failed after the 200: an error event was sent
    error = outcome.error or ""
    if error.startswith("upstream returned"):
        return "upstream_4xx" if status < 500 else "upstream_5xx"
    if status == 504:
        return "timeout"
    if status == 503:
        return "unreachable"
    return OTHER
