"""Rendering the registry, in one process or merged from every worker's files."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from prometheus_client import REGISTRY, CollectorRegistry, generate_latest, multiprocess, values

from gateway.logging import get_logger

log = get_logger(__name__)

# Called on the event loop before each scrape is rendered: series read from in-memory state
# (the fleet's engines and claims) are written then, so they are never older than the scrape.
_before_scrape: list[Callable[[], None]] = []


def refresh_before_scrape(hook: Callable[[], None]) -> Callable[[], None]:
    """Call `hook` before every scrape (cheap, in-memory reads only: it runs on the event
    loop); returns the call that stops it."""
    _before_scrape.append(hook)
    return lambda: _before_scrape.remove(hook)


def run_before_scrape() -> None:
    """Run every hook registered with `refresh_before_scrape`."""
    for hook in list(_before_scrape):
        hook()


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


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process is there
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # there, but another user's
    return True


def remove_dead_processes(directory: str | None = None) -> list[int]:
    """Drop the live gauges of processes that no longer exist; returns their pids, sorted.

    A worker that exits cleanly removes its own live gauges (`mark_process_stopped`); one that
    is killed (SIGKILL, out of memory) leaves them, and `/metrics` would keep adding its queue
    depth, in-flight requests and slots to the live workers' forever. Run at startup, so a
    worker that replaces a killed one clears what the killed one left. Counters and histograms
    stay: Prometheus sees them continue instead of reset. Without `directory`, the
    PROMETHEUS_MULTIPROC_DIR of multiprocess mode (nothing to do outside that mode).
    """
    if directory is None:
        # (prometheus_client's deprecated lower-case spelling is not documented here.)
        directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR") if multiprocess_enabled() else None
        if directory is None:
            return []
    own = os.getpid()
    dead: set[int] = set()
    # Live gauges' files are named gauge_live<mode>_<pid>.db (prometheus_client's naming).
    for path in Path(directory).glob("gauge_live*_*.db"):
        pid_text = path.stem.rsplit("_", 1)[-1]
        if not pid_text.isdigit():
            continue
        pid = int(pid_text)
        if pid > 0 and pid != own and pid not in dead and not _process_exists(pid):
            dead.add(pid)
    for pid in dead:
        multiprocess.mark_process_dead(pid, directory)  # type: ignore[no-untyped-call]
    if dead:
        # A worker was killed: worth an operator's attention, whatever the log level.
        log.warning("metrics_dead_processes_removed", pids=sorted(dead))
    return sorted(dead)
