"""Usage retention on SQLite and real Postgres: expired rows are rolled up into daily totals and
deleted in bounded batches, every report is the same before and after, a rollup never counts a
row twice (run again, interrupted by an error, or run by two processes at once)."""

from __future__ import annotations

import asyncio
import sys
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select, text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from gateway.db import utcnow
from gateway.keys.models import ApiKey
from gateway.usage import retention, service
from gateway.usage.models import UsageDaily, UsageRecord
from tests.helpers.app import make_settings, running_app
from tests.helpers.keys import add_user
from tests.helpers.paths import REPO
from tests.helpers.polling import eventually

Sessions = async_sessionmaker[AsyncSession]
NOW = datetime(2026, 3, 10, 15, 30, tzinfo=UTC)
RETENTION_DAYS = 7
# Midnight UTC that starts the 7 kept days (2026-03-04): older rows expire.
CUTOFF = datetime(2026, 3, 4, tzinfo=UTC)


async def seed(sessions: Sessions, *, now: datetime, expired: int, kept: int) -> dict[str, Any]:
    """Two users with keys, a login user, anonymous rows; `expired` rows spread over the 20
    days before the cutoff of `now` (one a microsecond before it) and `kept` rows after it (one
    exactly at it). Every column the rollup sums or groups by varies."""
    alice = await add_user(sessions, f"alice-{uuid.uuid4().hex[:6]}")
    bob = await add_user(sessions, f"bob-{uuid.uuid4().hex[:6]}")
    cutoff = retention.retention_cutoff(retention_days=RETENTION_DAYS, now=now)
    async with sessions() as session:
        keys = [
            ApiKey(
                user_id=owner.id, prefix=f"sk-vcg-r{i}", digest=uuid.uuid4().hex * 2, tier="free"
            )
            for i, owner in enumerate([alice, alice, bob])
        ]
        session.add_all(keys)
        await session.flush()
        owners = [(alice.id, keys[0].id), (alice.id, keys[1].id), (bob.id, keys[2].id),
                  (alice.id, None), (None, None)]  # fmt: skip

        def row(i: int, when: datetime) -> UsageRecord:
            user_id, key_id = owners[i % len(owners)]
            return UsageRecord(
                created_at=when,
                request_id=f"r{i}",
                user_id=user_id,
                api_key_id=key_id,
                endpoint=("/v1/chat/completions", "/v1/completions", "/api/chat")[i % 3],
                model=("tiny", "big", None, "tiny")[i % 4],
                status_code=(200, 200, 429, 500, 200)[i % 5],
                duration_ms=17 * i + 3,
                prompt_tokens=(i * 7) % 101,
                completion_tokens=(i * 13) % 97,
                route="cloud" if i % 6 == 0 else "local",
            )

        rows = [row(0, cutoff - timedelta(microseconds=1)), row(1, cutoff)]
        rows += [
            row(i, cutoff - timedelta(days=i % 20, hours=i % 24, minutes=i % 60, seconds=1))
            for i in range(2, expired + 1)
        ]
        rows += [
            row(i, cutoff + timedelta(hours=(i * 5) % (RETENTION_DAYS * 24 - 16), minutes=i % 60))
            for i in range(expired + 1, expired + kept)
        ]
        session.add_all(rows)
        await session.commit()
    return {"alice": alice, "bob": bob, "keys": keys, "cutoff": cutoff}


async def raw_count(sessions: Sessions, *, before: datetime | None = None) -> int:
    query = select(func.count()).select_from(UsageRecord)
    if before is not None:
        query = query.where(UsageRecord.created_at < before)
    async with sessions() as session:
        return int(await session.scalar(query) or 0)


async def daily_requests(sessions: Sessions) -> int:
    async with sessions() as session:
        return int(await session.scalar(select(func.sum(UsageDaily.requests))) or 0)


def _by(entries: list[Any], name: str) -> dict[Any, dict[str, Any]]:
    # Keyed, not listed: equally busy groups may come back in either order.
    return {getattr(entry, name): entry.model_dump() for entry in entries}


async def reports(
    sessions: Sessions, now: datetime, user_id: uuid.UUID | None = None
) -> dict[int, Any]:
    """The usage report over several ranges (the widest covers every seeded row)."""
    out: dict[int, Any] = {}
    async with sessions() as session:
        for days in (1, RETENTION_DAYS, RETENTION_DAYS + 1, 15, 30, 366):
            report = await service.usage_report(session, days=days, user_id=user_id, now=now)
            out[days] = {
                "totals": report.totals.model_dump(),
                "by_day": [d.model_dump() for d in report.by_day],
                "by_user": _by(report.by_user, "user_id"),
                "by_key": _by(report.by_key, "key_id"),
                "by_model": _by(report.by_model, "model"),
            }
    return out


async def test_expired_rows_are_rolled_up_and_every_report_stays_the_same(
    sessions: Sessions,
) -> None:
    ids = await seed(sessions, now=NOW, expired=120, kept=40)
    before = await reports(sessions, NOW)
    before_bob = await reports(sessions, NOW, user_id=ids["bob"].id)
    assert before[366]["totals"]["requests"] == 160
    assert (
        before[RETENTION_DAYS + 1]["totals"]["requests"]
        > before[RETENTION_DAYS]["totals"]["requests"]
    )  # the ranges reach into the expired days: the comparison means something

    moved = await retention.prune_usage(
        sessions, retention_days=RETENTION_DAYS, batch_size=25, now=NOW, pause_s=0
    )

    assert moved == 120
    assert await raw_count(sessions, before=CUTOFF) == 0
    assert await raw_count(sessions) == 40  # the kept rows, the one exactly at the cutoff too
    assert await daily_requests(sessions) == 120
    assert await reports(sessions, NOW) == before
    assert await reports(sessions, NOW, user_id=ids["bob"].id) == before_bob
    async with sessions() as session:
        groups = (await session.execute(select(UsageDaily))).scalars().all()
        # One row per day and group, every day before the cutoff.
        assert len({g.bucket for g in groups}) == len(groups)
        assert max(g.day for g in groups) == (CUTOFF - timedelta(days=1)).date()
        assert all(g.day < CUTOFF.date() for g in groups)


async def test_batches_are_bounded(sessions: Sessions) -> None:
    await seed(sessions, now=NOW, expired=23, kept=5)
    sizes = []
    while size := await retention.roll_up_batch(sessions, before=CUTOFF, batch_size=7):
        sizes.append(size)
        assert await raw_count(sessions, before=CUTOFF) == 23 - sum(sizes)
    assert sizes == [7, 7, 7, 2]
    assert await daily_requests(sessions) == 23
    assert await raw_count(sessions) == 5


async def test_a_rollup_is_idempotent_and_adds_to_existing_days(sessions: Sessions) -> None:
    ids = await seed(sessions, now=NOW, expired=30, kept=3)
    await retention.prune_usage(sessions, retention_days=RETENTION_DAYS, batch_size=10, now=NOW)
    after_first = await reports(sessions, NOW)
    async with sessions() as session:
        first_rows = {g.bucket: g.requests for g in (await session.scalars(select(UsageDaily)))}

    # Again: nothing left to add, nothing counted twice.
    assert (
        await retention.prune_usage(sessions, retention_days=RETENTION_DAYS, batch_size=10, now=NOW)
        == 0
    )
    assert await reports(sessions, NOW) == after_first

    # A late row of a group already rolled up (same day, user, key, model, endpoint, route)
    # lands in the same daily row.
    async with sessions() as session:
        group = (await session.scalars(select(UsageDaily).order_by(UsageDaily.day))).first()
        assert group is not None
        session.add(
            UsageRecord(
                created_at=datetime.combine(group.day, datetime.min.time(), tzinfo=UTC),
                user_id=group.user_id, api_key_id=group.api_key_id, endpoint=group.endpoint,
                model=group.model, route=group.route, status_code=503, duration_ms=1000,
                prompt_tokens=11, completion_tokens=0,
            )
        )  # fmt: skip
        await session.commit()
    assert (
        await retention.prune_usage(sessions, retention_days=RETENTION_DAYS, batch_size=10, now=NOW)
        == 1
    )
    async with sessions() as session:
        rows = {g.bucket: g for g in (await session.scalars(select(UsageDaily)))}
    assert set(rows) == set(first_rows)
    assert rows[group.bucket].requests == first_rows[group.bucket] + 1
    assert rows[group.bucket].errors == group.errors + 1
    assert rows[group.bucket].prompt_tokens == group.prompt_tokens + 11
    assert rows[group.bucket].duration_ms_sum == group.duration_ms_sum + 1000
    assert (await reports(sessions, NOW))[366]["totals"]["requests"] == 34
    assert ids["alice"].id in {g.user_id for g in rows.values()}


def _refuse_rollups(dialect: str) -> list[str]:
    """DDL of a trigger that fails every insert into usage_daily (a fault in mid-batch)."""
    if dialect == "postgresql":
        return [
            "CREATE FUNCTION refuse_rollup() RETURNS trigger LANGUAGE plpgsql AS "
            "$$ BEGIN RAISE EXCEPTION 'refused'; END $$",
            "CREATE TRIGGER refuse_rollup BEFORE INSERT ON usage_daily "
            "FOR EACH ROW EXECUTE FUNCTION refuse_rollup()",
        ]
    return [
        "CREATE TRIGGER refuse_rollup BEFORE INSERT ON usage_daily "
        "BEGIN SELECT RAISE(ABORT, 'refused'); END"
    ]


async def test_a_failed_rollup_deletes_nothing_and_the_background_task_retries(
    engine: AsyncEngine, sessions: Sessions
) -> None:
    now = utcnow()
    await seed(sessions, now=now, expired=12, kept=2)
    cutoff = retention.retention_cutoff(retention_days=RETENTION_DAYS, now=now)
    async with engine.begin() as conn:
        for ddl in _refuse_rollups(engine.dialect.name):
            await conn.execute(text(ddl))

    # The upsert fails after the DELETE: both are undone together.
    with pytest.raises(Exception, match="refused"):
        await retention.roll_up_batch(sessions, before=cutoff, batch_size=5)
    assert await raw_count(sessions, before=cutoff) == 12
    assert await daily_requests(sessions) == 0

    # The background task logs the failure, keeps running, and succeeds once the fault is gone.
    task = asyncio.create_task(
        retention.prune_forever(
            sessions, retention_days=RETENTION_DAYS, batch_size=5, interval_s=0.05
        )
    )
    try:
        await asyncio.sleep(0.3)
        assert not task.done()
        assert await raw_count(sessions, before=cutoff) == 12
        async with engine.begin() as conn:
            await conn.execute(text("DROP TRIGGER refuse_rollup ON usage_daily")
                               if engine.dialect.name == "postgresql"
                               else text("DROP TRIGGER refuse_rollup"))  # fmt: skip

        async def pruned() -> bool:
            return await raw_count(sessions, before=cutoff) == 0

        await eventually(pruned, timeout_s=10)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    assert await daily_requests(sessions) == 12
    assert await raw_count(sessions) == 2


# Run by each of two processes: say it is ready (imports done), wait for the start signal, prune
# in small batches with a pause between them (as the background task does), print the rows moved.
PRUNER = """
import asyncio, sys
from datetime import datetime
from pathlib import Path
from gateway.db import create_engine, create_session_factory
from gateway.usage.retention import prune_usage

async def main(url, ready, go, now, days):
    Path(ready).touch()
    while not Path(go).exists():
        await asyncio.sleep(0.005)
    engine = create_engine(url)
    try:
        moved = await prune_usage(
            create_session_factory(engine), retention_days=int(days), batch_size=20,
            now=datetime.fromisoformat(now), pause_s=0.01,
        )
    finally:
        await engine.dispose()
    print(moved)

asyncio.run(main(*sys.argv[1:]))
"""


async def _start_pruner(db_url: str, ready: Path, go: Path) -> asyncio.subprocess.Process:
    args = [db_url, str(ready), str(go), NOW.isoformat(), str(RETENTION_DAYS)]
    return await asyncio.create_subprocess_exec(
        sys.executable, "-c", PRUNER, *args, cwd=REPO,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip


async def test_two_gateway_processes_pruning_at_once_count_every_row_once(
    db_url: str, sessions: Sessions, tmp_path: Path
) -> None:
    expired = 1200
    await seed(sessions, now=NOW, expired=expired, kept=30)
    before = await reports(sessions, NOW)
    go = tmp_path / "go"
    ready = [tmp_path / "ready-a", tmp_path / "ready-b"]
    procs = [await _start_pruner(db_url, path, go) for path in ready]

    async def both_ready() -> bool:
        return all(path.exists() for path in ready)

    await eventually(both_ready, timeout_s=60)
    go.touch()
    outputs = await asyncio.wait_for(asyncio.gather(*(p.communicate() for p in procs)), 120)
    for proc, (_, err) in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, err.decode()
    moved = [int(out.decode().strip()) for out, _ in outputs]

    assert sum(moved) == expired, moved  # each row moved by exactly one process
    assert all(count > 0 for count in moved), moved  # both really pruned at the same time
    assert await raw_count(sessions, before=CUTOFF) == 0
    assert await daily_requests(sessions) == expired
    assert await reports(sessions, NOW) == before


async def test_the_gateway_prunes_in_the_background_and_its_api_shows_the_same_totals(
    db_url: str, sessions: Sessions
) -> None:
    admin_key = "adm-" + "R3t3nt10nK3y-4242"
    admin = {"Authorization": f"Bearer {admin_key}"}
    now = utcnow()
    await seed(sessions, now=now, expired=60, kept=10)
    cutoff = retention.retention_cutoff(retention_days=RETENTION_DAYS, now=now)
    settings = make_settings(
        DATABASE_URL=db_url, REQUIRE_AUTH=True, ADMIN_API_KEY=admin_key,
        USAGE_RETENTION_DAYS=RETENTION_DAYS, USAGE_PRUNE_BATCH_SIZE=8,
    )  # fmt: skip
    async with sessions() as session:
        expected = (await service.usage_report(session, days=30, now=now)).totals.model_dump()
    assert expected["requests"] == 70

    async with running_app(settings) as (app, client):
        names = {task.get_coro().__qualname__ for task in app.state.resources.background}
        assert "prune_forever" in names

        async def pruned() -> bool:
            return await raw_count(sessions, before=cutoff) == 0

        await eventually(pruned, timeout_s=20)
        reply = await client.get("/admin/api/usage?days=30", headers=admin)
    assert reply.status_code == 200, reply.text
    assert reply.json()["totals"] == expected
    assert await daily_requests(sessions) == 60
    assert await raw_count(sessions) == 10


async def test_retention_zero_keeps_every_row(db_url: str, sessions: Sessions) -> None:
    now = utcnow()
    await seed(sessions, now=now, expired=10, kept=1)
    settings = make_settings(DATABASE_URL=db_url, USAGE_RETENTION_DAYS=0)
    async with running_app(settings) as (app, _):
        # No pruner among the background tasks (the crash sweep is one).
        names = {task.get_coro().__qualname__ for task in app.state.resources.background}
        assert "prune_forever" not in names
    assert await raw_count(sessions) == 11
    with pytest.raises(ValueError, match="retention_days"):
        await retention.prune_usage(sessions, retention_days=0, batch_size=10)
