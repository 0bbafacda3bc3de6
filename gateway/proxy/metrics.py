"""The proxy's series: per-model requests, latency, tokens and errors of relayed requests, and
admission (queue, local slots, overflow). Label children are bound once and kept in dicts, as in
`gateway.metrics.recorders`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from gateway.metrics.recorders import MAX_CACHED, OTHER
from gateway.metrics.series import (
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
    SWAP_WAIT,
)

if TYPE_CHECKING:
    from gateway.engine import ModelControl
    from gateway.proxy.upstream import Outcome

# An external engine's own names become labels up to this many.
_MAX_ENGINE_NAMES = 256


class ModelNames:
    """Maps a model name to its metric label: a profile's served name (aliases fold into it),
    a configured cloud model, a name the running external engine lists, or "other"."""

    def __init__(self, control: ModelControl, cloud_names: frozenset[str]) -> None:
        self._control = control
        self._cloud = cloud_names
        self._profiles: object = None
        self._names: dict[str, str] = {}
        self._engine_names = 0

    def known(self) -> list[tuple[str, str]]:
        """(model, upstream) of every profile's served name (local) and cloud model (cloud)."""
        local = [
            (profile.served_model_name, "local")
            for profile in self._control.profiles.profiles.values()
        ]
        return [*local, *((name, "cloud") for name in sorted(self._cloud))]

    def is_known(self, name: str) -> bool:
        """Whether `name` names a model here: a profile's served name or alias, a configured
        cloud model, or a name the running engine lists."""
        self.label(name)  # (re)builds the names of the profiles loaded now
        return name in self._names or name in self._control.manager.status().served_names

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
        if label != OTHER or len(self._series) < MAX_CACHED:
            self._series[(model, upstream)] = series
        return series

    def start_at_zero(self) -> None:
        """Create the request, token, error and overflow counters at 0 for every model the
        profiles and the cloud upstream name, so dashboards show 0, not "no data", on a fresh
        gateway (models of profiles added by a reload appear with their first request)."""
        for model, upstream in self.names.known():
            series = self._bind(model, upstream)
            for reason in ERROR_REASONS:
                MODEL_ERRORS.labels(model=series.model, upstream=series.upstream, reason=reason)
            if upstream == "local":
                self._overflow_child(model)

    # -- admission ---------------------------------------------------------------------------

    def overflowed(self, model: str | None) -> None:
        """A request went to the cloud instead of the local engine."""
        self._overflow_child(model).inc()

    def _overflow_child(self, model: str | None) -> Any:
        label = self.names.label(model)
        child = self._overflow.get(label)
        if child is None:
            child = self._overflow[label] = OVERFLOW.labels(model=label)
        return child

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

    def swap_requested(self, profile_id: str, waited_s: float) -> None:
        """A request asked the fleet to load or wake a model after waiting `waited_s` for the
        engines it evicts to finish their queues (labelled by profile id: a bounded set)."""
        SWAP_WAIT.labels(model=profile_id).observe(waited_s)


#: Every reason `_error_reason` gives (its series exist at 0 for each known model).
ERROR_REASONS = (
    "client_disconnected",
    "stream_error",
    "upstream_4xx",
    "upstream_5xx",
    "timeout",
    "unreachable",
    OTHER,
)


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
