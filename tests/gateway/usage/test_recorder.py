"""UsageRecorder: batched multi-row inserts off the request path; nothing lost on shutdown or on
a database outage (real Postgres paused under it)."""

from __future__ import annotations

import asyncio
import math
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event, func, select
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from gateway.db import create_engine, create_session_factory
from gateway.migrate import upgrade
from gateway.usage.models import UsageRecord
from gateway.usage.recorder import UsageRecorder
from tests.helpers.postgres import PostgresServer

Sessions = async_sessionmaker[AsyncSession]


def _record(recorder: UsageRecorder, n: int, **overrides: Any) -> None:
    for i in range(n):
        values: dict[str, Any] = {
            "user_id": None,
            "key_id": None,
            "endpoint": "/v1/chat/completions",
            "model": "tiny",
            "status_code": 200,
            "duration_ms": 12.5,
            "usage": {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7},
            "route": "local",
            "request_id": f"req-{i}",
        }
        values.update(overrides)
        recorder.record(**values)


async def _rows(sessions: Sessions) -> list[UsageRecord]:
    async with sessions() as session:
        return list((await session.execute(select(UsageRecord).order_by(UsageRecord.id))).scalars())


def _count_inserts(engine: AsyncEngine) -> tuple[list[int], Callable[[], None]]:
    """INSERT calls executed on `engine` (rows of each), and a function that stops counting."""
    seen: list[int] = []

    def before(_c: Any, _cur: Any, statement: str, parameters: Any, _ctx: Any, many: bool) -> None:
        if statement.lstrip().upper().startswith("INSERT INTO USAGE_RECORDS"):
            # Rows in this call: one executemany of a cached statement (the driver sends it
            # in one go: SQLite in C, asyncpg pipelined), or a multi-row VALUES statement.
            seen.append(len(parameters) if many else len(parameters) // 11)

    event.listen(engine.sync_engine, "before_cursor_execute", before)
    return seen, lambda: event.remove(engine.sync_engine, "before_cursor_execute", before)


async def _until(condition: Callable[[], bool], within_s: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + within_s
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


async def test_records_are_written_in_batches_of_one_insert_each(
    sessions: Sessions, engine: AsyncEngine
) -> None:
    recorder = UsageRecorder(sessions, flush_interval_s=60, batch_size=500)
    inserts, stop = _count_inserts(engine)
    try:
        _record(recorder, 1234)
        assert recorder.pending == 1234
        assert recorder.written == 0
        await recorder.aclose()
    finally:
        stop()
    assert inserts == [500, 500, 234]  # one call per batch, never one per row
    assert (recorder.pending, recorder.written, recorder.dropped) == (0, 1234, 0)
    rows = await _rows(sessions)
    assert len(rows) == 1234
    assert {r.request_id for r in rows} == {f"req-{i}" for i in range(1234)}
    first = rows[0]
    assert (first.prompt_tokens, first.completion_tokens, first.duration_ms) == (3, 4, 12)
    assert (first.endpoint, first.model, first.status_code, first.route) == (
        "/v1/chat/completions", "tiny", 200, "local",
    )  # fmt: skip


async def test_background_writer_flushes_full_batches_and_on_the_interval(
    sessions: Sessions,
) -> None:
    full = UsageRecorder(sessions, flush_interval_s=3600, batch_size=10)
    full.start()
    _record(full, 25)
    # A full batch wakes the writer at once (no waiting an hour); it writes all it holds.
    await _until(lambda: full.written == 25)
    assert full.pending == 0
    await full.aclose()
    assert full.written == 25

    timed = UsageRecorder(sessions, flush_interval_s=0.05, batch_size=1000)
    timed.start()
    _record(timed, 3)
    await _until(lambda: timed.written == 3)
    await timed.aclose()
    assert len(await _rows(sessions)) == 28


async def test_aclose_writes_everything_left_and_later_records_are_counted_as_dropped(
    sessions: Sessions,
) -> None:
    recorder = UsageRecorder(sessions, flush_interval_s=3600, batch_size=100)
    recorder.start()
    _record(recorder, 7)
    await recorder.aclose()
    assert recorder.written == 7
    assert len(await _rows(sessions)) == 7
    _record(recorder, 1)
    assert recorder.dropped == 1
    assert recorder.pending == 0


async def test_a_disabled_recorder_keeps_and_writes_nothing(sessions: Sessions) -> None:
    recorder = UsageRecorder(sessions, flush_interval_s=3600, batch_size=1, enabled=False)
    recorder.start()
    _record(recorder, 5)
    assert recorder.pending == 0
    await recorder.aclose()
    assert recorder.written == 0
    assert recorder.dropped == 0
    assert await _rows(sessions) == []


async def test_bad_values_are_sanitised_not_fatal(sessions: Sessions) -> None:
    recorder = UsageRecorder(sessions, flush_interval_s=3600, batch_size=100)
    user, key = uuid.uuid4(), uuid.uuid4()
    recorder.record(
        user_id=user,
        key_id=key,
        endpoint="/v1/" + "e" * 500,
        model="m" * 1000,
        status_code=502,
        duration_ms=math.nan,
        usage={"prompt_tokens": "12", "completion_tokens": -5},
        route="cloud",
        request_id="r" * 999,
    )
    recorder.record(
        user_id=None, key_id=None, endpoint="/v1/embeddings", model=None, status_code=200,
        duration_ms=1e30, usage=None,
    )  # fmt: skip
    await recorder.aclose()
    odd, huge = await _rows(sessions)
    assert (odd.user_id, odd.api_key_id, odd.route, odd.status_code) == (user, key, "cloud", 502)
    assert (len(odd.endpoint), len(odd.model or ""), len(odd.request_id)) == (64, 256, 128)
    assert (odd.duration_ms, odd.prompt_tokens, odd.completion_tokens) == (0, 0, 0)
    assert huge.duration_ms == 2**31 - 1
    assert huge.model is None


async def test_a_failing_database_keeps_the_rows_within_the_bound(tmp_path: Path) -> None:
    # No tables yet: every flush fails, as with a database that is down.
    url = f"sqlite+aiosqlite:///{tmp_path / 'late.db'}"
    engine = create_engine(url)
    sessions = create_session_factory(engine)
    try:
        recorder = UsageRecorder(sessions, flush_interval_s=3600, batch_size=4, max_pending=10)
        _record(recorder, 8)
        assert await recorder.flush() == 0
        assert (recorder.pending, recorder.written, recorder.dropped) == (8, 0, 0)
        assert recorder.failures == 1
        _record(recorder, 5, request_id="late")
        # Bounded: the 3 oldest rows are dropped and counted.
        assert (recorder.pending, recorder.dropped) == (10, 3)
        await asyncio.to_thread(upgrade, url)
        await recorder.aclose()
        assert (recorder.pending, recorder.written) == (0, 10)
        ids = [r.request_id for r in await _rows(sessions)]
        assert ids == ["req-3", "req-4", "req-5", "req-6", "req-7", *["late"] * 5]
    finally:
        await engine.dispose()


@pytest.mark.postgres
async def test_postgres_down_during_a_flush_loses_nothing(
    pg_url: str, postgres_server: PostgresServer
) -> None:
    engine = create_engine(pg_url)
    sessions = create_session_factory(engine)
    recorder = UsageRecorder(sessions, flush_interval_s=0.05, batch_size=50)
    try:
        recorder.start()
        _record(recorder, 30, request_id="before")
        await _until(lambda: recorder.written == 30)
        postgres_server.pause()
        try:
            # The request path never touches the database: recording works while it is down.
            _record(recorder, 120, request_id="during")
            assert recorder.pending == 120
            await _until(lambda: recorder.failures >= 1)
            assert recorder.written == 30
            assert recorder.pending == 120
            assert recorder.dropped == 0
        finally:
            postgres_server.resume()
        await recorder.aclose()
    finally:
        await engine.dispose()
    assert (recorder.written, recorder.pending, recorder.dropped) == (150, 0, 0)
    check = create_engine(pg_url)
    try:
        async with create_session_factory(check)() as session:
            count = await session.scalar(select(func.count()).select_from(UsageRecord))
    finally:
        await check.dispose()
    assert count == 150
