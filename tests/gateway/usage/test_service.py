"""Usage report on SQLite and real Postgres: exact groups per day, user, key and model."""

from __future__ import annotations

import uuid
from datetime import UTC, date, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from gateway.errors import GatewayError
from gateway.keys.models import ApiKey
from gateway.usage import service
from gateway.usage.models import UsageRecord
from tests.helpers.keys import add_user

Sessions = async_sessionmaker[AsyncSession]
NOW = datetime(2026, 3, 10, 15, 30, tzinfo=UTC)


def usage_row(when: datetime, **values: Any) -> UsageRecord:
    """One usage record (defaults: a 200 on the local engine, 10 + 5 tokens, 100 ms)."""
    defaults: dict[str, Any] = {
        "created_at": when,
        "endpoint": "/v1/chat/completions",
        "model": "tiny",
        "status_code": 200,
        "duration_ms": 100,
        "prompt_tokens": 10,
        "completion_tokens": 5,
        "route": "local",
    }
    return UsageRecord(**{**defaults, **values})


async def seed_usage(sessions: Sessions, now: datetime) -> dict[str, Any]:
    """Two users, three keys, two models, over several days (one row outside 7 days)."""
    alice = await add_user(sessions, "alice")
    bob = await add_user(sessions, "bob")
    async with sessions() as session:
        keys = [
            ApiKey(user_id=owner.id, prefix=f"sk-vcg-k{i}", digest=f"{i:064x}", tier="free")
            for i, owner in enumerate([alice, alice, bob])
        ]
        session.add_all(keys)
        await session.flush()
        a1, a2, b1 = keys
        midnight = datetime.combine(now.date(), datetime.min.time(), tzinfo=UTC)
        today = midnight + timedelta(minutes=1)
        session.add_all(
            [
                # today: alice key a1 x2 (one error), bob b1 on the cloud, one anonymous row
                usage_row(today, user_id=alice.id, api_key_id=a1.id, duration_ms=100),
                usage_row(today, user_id=alice.id, api_key_id=a1.id, status_code=500,
                          prompt_tokens=0, completion_tokens=0, duration_ms=300),
                usage_row(today, user_id=bob.id, api_key_id=b1.id, route="cloud",
                          model="big", prompt_tokens=100, completion_tokens=50),
                usage_row(today, user_id=None, api_key_id=None, model=None),
                # yesterday just before midnight UTC: alice by login (no key), model big
                usage_row(midnight - timedelta(microseconds=1), user_id=alice.id,
                          model="big", duration_ms=50, status_code=429),
                # six days ago at 00:00:00 exactly: still inside days=7
                usage_row(midnight - timedelta(days=6), user_id=alice.id, api_key_id=a2.id),
                # seven days ago: outside days=7, inside days=8
                usage_row(midnight - timedelta(days=6, seconds=1), user_id=bob.id,
                          api_key_id=b1.id),
            ]
        )  # fmt: skip
        await session.commit()
    return {"alice": alice, "bob": bob, "a1": a1, "a2": a2, "b1": b1}


def _stats(entry: Any) -> tuple[int, int, int, int, int, float]:
    return (
        entry.requests,
        entry.prompt_tokens,
        entry.completion_tokens,
        entry.errors,
        entry.cloud_requests,
        entry.avg_duration_ms,
    )


async def test_admin_report_groups_and_totals_exactly(sessions: Sessions) -> None:
    ids = await seed_usage(sessions, NOW)
    async with sessions() as session:
        report = await service.usage_report(session, days=7, now=NOW)

    assert report.since == datetime(2026, 3, 4, tzinfo=UTC)
    assert _stats(report.totals) == (6, 140, 70, 2, 1, 125.0)
    assert report.totals.total_tokens == 210

    assert [d.date for d in report.by_day] == [
        date(2026, 3, 4) + timedelta(days=n) for n in range(7)
    ]
    per_day = {d.date: _stats(d) for d in report.by_day if d.requests}
    assert per_day == {
        date(2026, 3, 4): (1, 10, 5, 0, 0, 100.0),
        date(2026, 3, 9): (1, 10, 5, 1, 0, 50.0),
        date(2026, 3, 10): (4, 120, 60, 1, 1, 150.0),
    }
    assert sum(d.requests for d in report.by_day) == report.totals.requests

    by_user = {u.username: _stats(u) for u in report.by_user}
    assert by_user == {
        "alice": (4, 30, 15, 2, 0, 137.5),
        "bob": (1, 100, 50, 0, 1, 100.0),
        None: (1, 10, 5, 0, 0, 100.0),
    }
    assert next(u for u in report.by_user if u.username == "alice").user_id == ids["alice"].id

    by_key = {k.prefix: _stats(k) for k in report.by_key}
    assert by_key == {
        "sk-vcg-k0": (2, 10, 5, 1, 0, 200.0),
        "sk-vcg-k1": (1, 10, 5, 0, 0, 100.0),
        "sk-vcg-k2": (1, 100, 50, 0, 1, 100.0),
        None: (2, 20, 10, 1, 0, 75.0),
    }
    by_model = {m.model: _stats(m) for m in report.by_model}
    assert by_model == {
        "tiny": (3, 20, 10, 1, 0, 166.67),
        "big": (2, 110, 55, 1, 1, 75.0),
        None: (1, 10, 5, 0, 0, 100.0),
    }
    assert report.by_user[0].username == "alice"  # busiest first

    async with sessions() as session:
        wider = await service.usage_report(session, days=8, now=NOW)
    assert wider.totals.requests == 7
    assert len(wider.by_day) == 8


async def test_own_report_holds_only_the_callers_requests(sessions: Sessions) -> None:
    ids = await seed_usage(sessions, NOW)
    async with sessions() as session:
        bob = await service.own_usage(session, days=7, user_id=ids["bob"].id, now=NOW)
        nobody = await service.own_usage(session, days=7, user_id=uuid.uuid4(), now=NOW)
        with pytest.raises(GatewayError) as anonymous:
            await service.own_usage(session, days=7, user_id=None, now=NOW)
    assert anonymous.value.status_code == 403
    assert _stats(bob.totals) == (1, 100, 50, 0, 1, 100.0)
    assert [u.username for u in bob.by_user] == ["bob"]
    assert [k.key_id for k in bob.by_key] == [ids["b1"].id]
    assert nobody.totals.requests == 0
    assert nobody.by_user == []
    assert len(nobody.by_day) == 7


async def test_days_out_of_range_are_refused(sessions: Sessions) -> None:
    async with sessions() as session:
        for days in (0, 367):
            with pytest.raises(ValueError, match="days"):
                await service.usage_report(session, days=days, now=NOW)
        assert len((await service.usage_report(session, days=366, now=NOW)).by_day) == 366


@pytest.mark.postgres
async def test_days_are_utc_days_whatever_the_postgres_session_time_zone(pg_url: str) -> None:
    from gateway.db import create_engine, create_session_factory

    engine = create_engine(pg_url)
    sessions = create_session_factory(engine)
    try:
        await seed_usage(sessions, NOW)
        async with sessions() as session:
            await session.execute(text("SET TIME ZONE 'Asia/Seoul'"))  # UTC+9
            report = await service.usage_report(session, days=7, now=NOW)
    finally:
        await engine.dispose()
    per_day = {d.date: d.requests for d in report.by_day if d.requests}
    assert per_day == {date(2026, 3, 4): 1, date(2026, 3, 9): 1, date(2026, 3, 10): 4}
