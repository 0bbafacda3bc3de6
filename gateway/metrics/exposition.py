"""Rendering the registry, in one process or merged from every worker's files."""

from __future__ import annotations

import os

from prometheus_client import REGISTRY, CollectorRegistry, generate_latest, multiprocess, values


def multiprocess_enabled() -> bool:
    """True when prometheus_client writes values to PROMETHEUS_MULTIPROC_DIR files.

    prometheus_client decides this once, when it is first imported, from the environment;
    a value only in `.env` is too late.
    """
    return values.ValueClass is not values.MutexValue


def render_latest() -> bytes:
    """The text exposition of every series (all worker processes' in multiprocess mode)."""
    if multiprocess_enabled():
        # A fresh registry per scrape, as prometheus_client documents for multiprocess mode.
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return generate_latest(registry)
    return generate_latest(REGISTRY)


def mark_process_stopped() -> None:
    """Drop this process's live gauges from the shared files (multiprocess mode only)."""
    if multiprocess_enabled():
        multiprocess.mark_process_dead(os.getpid())  # type: ignore[no-untyped-call]
