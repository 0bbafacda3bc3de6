"""Several worker processes, one scrape: with PROMETHEUS_MULTIPROC_DIR, each process writes its
values to files in that directory and /metrics (in any of them) merges every process's values.

Two real gateway processes (`python -m gateway serve`) share one directory, each gets its own
traffic, and one answers the scrape for both. A worker killed with SIGKILL cannot clean up after
itself: the next one to start removes the live gauges it left.
"""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

from gateway.metrics import remove_dead_processes
from tests.helpers.gateway_process import gateway_process
from tests.helpers.metrics import Scrape, scrape


async def test_two_processes_one_merged_scrape(tmp_path: Path) -> None:
    multiproc = tmp_path / "prometheus-multiproc"
    multiproc.mkdir()
    async with (
        gateway_process(multiproc, tmp_path) as (first, _),
        gateway_process(multiproc, tmp_path) as (second, _),
    ):
        # "/" is not what the startup probe polls: its count is exactly the traffic here.
        for _ in range(3):
            assert (await first.get("/")).status_code == 200
        for _ in range(5):
            assert (await second.get("/")).status_code == 200
        # Each process wrote its own files into the shared directory.
        assert len({p.name.rsplit("_", 1)[-1] for p in multiproc.glob("counter_*.db")}) == 2
        from_first = await scrape(first)
        from_second = await scrape(second)
        root = {"route": "/", "method": "GET"}
        # Both scrapes see both processes' requests.
        for merged in (from_first, from_second):
            assert merged.value("gateway_http_requests_total", status="200", **root) == 8
            assert merged.value("gateway_http_request_duration_seconds_count", **root) == 8
            # Live gauges sum over live processes: two schedulers with 4 slots each.
            assert merged.value("gateway_local_slots") == 8
            # Gauges that are the same in every process are not added up.
            assert merged.value("gateway_build_info") == 1
        await second.get("/")

    # Both stopped: their live gauges went with them, their counters stay (Prometheus sees
    # counters of a worker that was replaced continue, not reset).
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.multiprocess import MultiProcessCollector

    from gateway.metrics.exposition import render_latest  # noqa: F401  (imports the client)

    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(multiproc))  # type: ignore[no-untyped-call]
    after = Scrape(generate_latest(registry).decode())
    assert after.value("gateway_local_slots") == 0
    assert after.value("gateway_http_requests_total", route="/", status="200") == 9


def _pids(directory: Path, pattern: str) -> set[int]:
    return {int(p.stem.rsplit("_", 1)[-1]) for p in directory.glob(pattern)}


async def test_a_killed_workers_live_gauges_go_when_the_next_worker_starts(
    tmp_path: Path,
) -> None:
    multiproc = tmp_path / "prometheus-multiproc"
    multiproc.mkdir()
    async with gateway_process(multiproc, tmp_path) as (killed, process):
        for _ in range(2):
            assert (await killed.get("/")).status_code == 200
        assert (await scrape(killed)).value("gateway_local_slots") == 4
        # SIGKILL: no lifespan shutdown, so no mark_process_dead of its own.
        process.kill()
        await asyncio.wait_for(process.wait(), 30)
    dead = process.pid
    # What the gap was: the killed worker's live gauges are still in the directory.
    assert dead in _pids(multiproc, "gauge_live*_*.db")

    async with gateway_process(multiproc, tmp_path) as (replacement, _):
        merged = await scrape(replacement)
        # Only the live worker's slots, not 4 + 4 from a process that is gone...
        assert merged.value("gateway_local_slots") == 4
        assert merged.value("gateway_build_info") == 1
        # ...while the killed worker's counters stay (Prometheus sees them continue).
        root = {"route": "/", "method": "GET", "status": "200"}
        assert merged.value("gateway_http_requests_total", **root) == 2
        assert dead not in _pids(multiproc, "gauge_live*_*.db")
        assert dead in _pids(multiproc, "counter_*.db")


async def test_remove_dead_processes_keeps_live_processes_and_other_files(
    tmp_path: Path,
) -> None:
    finished = await asyncio.create_subprocess_exec(sys.executable, "-c", "pass")
    await finished.wait()  # waited for: its pid is free, not a zombie
    dead, own = finished.pid, os.getpid()
    names = [
        f"gauge_livesum_{dead}.db",
        f"gauge_livemostrecent_{dead}.db",
        f"counter_{dead}.db",
        f"histogram_{dead}.db",
        f"gauge_all_{dead}.db",  # not a live gauge: prometheus_client keeps it per pid
        f"gauge_livesum_{own}.db",
        "gauge_livesum_1.db",  # pid 1 always exists (and may be another user's)
    ]
    for name in names:
        (tmp_path / name).write_bytes(b"")
    assert remove_dead_processes(str(tmp_path)) == [dead]
    left = {p.name for p in tmp_path.iterdir()}
    assert left == set(names) - {f"gauge_livesum_{dead}.db", f"gauge_livemostrecent_{dead}.db"}
    # Nothing more to do the second time.
    assert remove_dead_processes(str(tmp_path)) == []
