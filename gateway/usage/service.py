"""Usage reports: GROUP BY queries that run the same on Postgres and SQLite."""

from __future__ import annotations

import uuid
from datetime import UTC, date, datetime, time, timedelta
from typing import Any

from sqlalchemy import Select, case, func, select
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.sql.elements import ColumnElement

from gateway.db import utcnow
from gateway.errors import GatewayError
from gateway.keys.models import ApiKey
from gateway.usage.models import UsageRecord
from gateway.usage.schemas import (
    DayUsage,
    KeyUsage,
    ModelUsage,
    UsageReport,
    UsageStats,
    UserUsage,
)
from gateway.users.models import User

MIN_DAYS = 1
MAX_DAYS = 366
_STAT_NAMES = (
    "requests",
    "prompt_tokens",
    "completion_tokens",
    "errors",
    "cloud_requests",
    "avg_duration_ms",
)


def _stat_columns() -> list[ColumnElement[Any]]:
    rec = UsageRecord
    return [
        func.count().label("requests"),
        func.coalesce(func.sum(rec.prompt_tokens), 0).label("prompt_tokens"),
        func.coalesce(func.sum(rec.completion_tokens), 0).label("completion_tokens"),
        func.coalesce(func.sum(case((rec.status_code >= 400, 1), else_=0)), 0).label("errors"),
        func.coalesce(func.sum(case((rec.route != "local", 1), else_=0)), 0).label(
            "cloud_requests"
        ),
        func.coalesce(func.avg(rec.duration_ms), 0).label("avg_duration_ms"),
    ]


def _stats(row: Any) -> dict[str, Any]:
    # Postgres returns Decimal averages and SQLite floats: normalise both.
    values: dict[str, Any] = {name: int(getattr(row, name) or 0) for name in _STAT_NAMES[:-1]}
    values["avg_duration_ms"] = round(float(row.avg_duration_ms or 0), 2)
    values["total_tokens"] = values["prompt_tokens"] + values["completion_tokens"]
    return values


def _day_bucket(dialect: str) -> ColumnElement[Any]:
    """The UTC calendar day of a record, computed in SQL."""
    if dialect == "postgresql":
        # timestamptz -> UTC wall time -> date, whatever the session's TimeZone is.
        return func.date(func.timezone("UTC", UsageRecord.created_at))
    # SQLite stores UTC wall times as 'YYYY-MM-DD HH:MM:SS.ffffff'; date() yields 'YYYY-MM-DD'.
    return func.date(UsageRecord.created_at)


def _as_date(value: date | str) -> date:
    if isinstance(value, datetime):
        return value.date()
    if isinstance(value, date):
        return value
    return date.fromisoformat(value)


def range_start(*, days: int, now: datetime) -> datetime:
    """Midnight UTC of the first day of a `days`-day range that ends today."""
    today = now.astimezone(UTC).date()
    return datetime.combine(today - timedelta(days=days - 1), time.min, tzinfo=UTC)


async def usage_report(
    session: AsyncSession,
    *,
    days: int,
    user_id: uuid.UUID | None = None,
    now: datetime | None = None,
) -> UsageReport:
    """Totals and groups per day, user, key and model over the last `days` UTC days (today
    included); only `user_id`'s requests when given."""
    if not MIN_DAYS <= days <= MAX_DAYS:
        raise ValueError(f"days must be between {MIN_DAYS} and {MAX_DAYS}")
    now = now or utcnow()
    since = range_start(days=days, now=now)
    dialect = session.get_bind().dialect.name

    def scoped(query: Select[Any]) -> Select[Any]:
        query = query.where(UsageRecord.created_at >= since)
        if user_id is not None:
            query = query.where(UsageRecord.user_id == user_id)
        return query

    stats = _stat_columns()
    totals_row = (await session.execute(scoped(select(*stats)))).one()

    day = _day_bucket(dialect).label("day")
    day_rows = await session.execute(scoped(select(day, *stats)).group_by(day))
    per_day = {_as_date(row.day): _stats(row) for row in day_rows}
    first = since.date()
    by_day = [
        DayUsage(date=first + timedelta(days=n), **per_day.get(first + timedelta(days=n), {}))
        for n in range(days)
    ]

    user_rows = await session.execute(
        scoped(select(UsageRecord.user_id, User.username, *stats))
        .outerjoin(User, User.id == UsageRecord.user_id)
        .group_by(UsageRecord.user_id, User.username)
    )
    by_user = [
        UserUsage(user_id=row.user_id, username=row.username, **_stats(row)) for row in user_rows
    ]

    key_rows = await session.execute(
        scoped(select(UsageRecord.api_key_id, ApiKey.prefix, *stats))
        .outerjoin(ApiKey, ApiKey.id == UsageRecord.api_key_id)
        .group_by(UsageRecord.api_key_id, ApiKey.prefix)
    )
    by_key = [KeyUsage(key_id=row.api_key_id, prefix=row.prefix, **_stats(row)) for row in key_rows]

    model_rows = await session.execute(
        scoped(select(UsageRecord.model, *stats)).group_by(UsageRecord.model)
    )
    by_model = [ModelUsage(model=row.model, **_stats(row)) for row in model_rows]

    def busiest(entry: UsageStats) -> tuple[int, int]:
        return (-entry.requests, -entry.prompt_tokens - entry.completion_tokens)

    return UsageReport(
        days=days,
        since=since,
        until=now,
        totals=UsageStats(**_stats(totals_row)),
        by_day=by_day,
        by_user=sorted(by_user, key=busiest),
        by_key=sorted(by_key, key=busiest),
        by_model=sorted(by_model, key=busiest),
    )


async def own_usage(
    session: AsyncSession, *, days: int, user_id: uuid.UUID | None, now: datetime | None = None
) -> UsageReport:
    """The caller's own report; a caller without an account has none (and never gets everyone's)."""
    if user_id is None:
        raise GatewayError(403, "Usage belongs to user accounts; sign in first.", code="forbidden")
    return await usage_report(session, days=days, user_id=user_id, now=now)
