"""Prometheus series of the gateway: definitions (series), request-path recorders, background
samplers (GPUs, engine events) and the `/metrics` route (router).

The series names and labels are listed in deploy/README.md; the dashboards in deploy/grafana
use every one of them.
"""

from __future__ import annotations

from gateway.metrics.background import BackgroundMetrics
from gateway.metrics.exposition import (
    mark_process_stopped,
    multiprocess_enabled,
    remove_dead_processes,
    render_latest,
)
from gateway.metrics.recorders import (
    HTTP,
    count_auth_failure,
    count_limiter_fallback,
    count_rate_limited,
    start_counters_at_zero,
)
from gateway.metrics.series import RATE_LIMITER_FALLBACK

__all__ = [
    "HTTP",
    "RATE_LIMITER_FALLBACK",
    "BackgroundMetrics",
    "count_auth_failure",
    "count_limiter_fallback",
    "count_rate_limited",
    "mark_process_stopped",
    "multiprocess_enabled",
    "remove_dead_processes",
    "render_latest",
    "start_counters_at_zero",
]
