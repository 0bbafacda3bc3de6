"""Usage reports: GROUP BY queries that run the same on Postgres and SQLite, over the raw rows
of the retention window and the daily totals older rows were rolled up into."""

from __future__ import annotations

import uuid
from datetime import UTC, date, datetime, time, timedelta
from typing import Any

from sqlalchemy import BigInteger, Subquery, case, cast, func, literal, select, union_all
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.sql.elements import ColumnElement

from gateway.db import utcnow
from gateway.errors import GatewayError
from gateway.keys.models import ApiKey
from gateway.usage.models import UsageDaily, UsageRecord
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
_COUNTS = ("requests", "prompt_tokens", "completion_tokens", "errors", "cloud_requests")


def _day_bucket(dialect: str) -> ColumnElement[Any]:
    """The UTC calendar day of a raw record, computed in SQL."""
    if dialect == "postgresql":
        # timestamptz -> UTC wall time -> date, whatever the session's TimeZone is.
        return func.date(func.timezone("UTC", UsageRecord.created_at))
    # SQLite stores UTC wall times as 'YYYY-MM-DD HH:MM:SS.ffffff'; date() yields 'YYYY-MM-DD'.
    return func.date(UsageRecord.created_at)


def _usage_since(dialect: str, *, since: datetime, user_id: uuid.UUID | None) -> Subquery:
    """Raw rows (one request each) and rolled-up days (usage_daily) in one shape, from `since`
    on: every report sums this, so totals stay the same when rows are rolled up and pruned."""
    raw, daily = UsageRecord, UsageDaily
    raw_rows = select(
        _day_bucket(dialect).label("day"),
        raw.user_id.label("user_id"),
        raw.api_key_id.label("api_key_id"),
        raw.model.label("model"),
        literal(1, BigInteger).label("requests"),
        cast(raw.prompt_tokens, BigInteger).label("prompt_tokens"),
        cast(raw.completion_tokens, BigInteger).label("completion_tokens"),
        cast(case((raw.status_code >= 400, 1), else_=0), BigInteger).label("errors"),
        cast(case((raw.route != "local", 1), else_=0), BigInteger).label("cloud_requests"),
        cast(raw.duration_ms, BigInteger).label("duration_ms"),
    ).where(raw.created_at >= since)
    daily_rows = select(
        daily.day.label("day"),
        daily.user_id.label("user_id"),
        daily.api_key_id.label("api_key_id"),
        daily.model.label("model"),
        daily.requests.label("requests"),
        daily.prompt_tokens.label("prompt_tokens"),
        daily.completion_tokens.label("completion_tokens"),
        daily.errors.label("errors"),
        case((daily.route != "local", daily.requests), else_=0).label("cloud_requests"),
        daily.duration_ms_sum.label("duration_ms"),
    ).where(daily.day >= since.date())
    if user_id is not None:
        raw_rows = raw_rows.where(raw.user_id == user_id)
        daily_rows = daily_rows.where(daily.user_id == user_id)
    return union_all(raw_rows, daily_rows).subquery("usage")


def _stat_columns(usage: Subquery) -> list[ColumnElement[Any]]:
    return [
        func.coalesce(func.sum(usage.c[name]), 0).label(name) for name in (*_COUNTS, "duration_ms")
    ]


def _stats(row: Any) -> dict[str, Any]:
    # Postgres returns Decimal sums of BIGINT and SQLite ints: normalise both.
    values: dict[str, Any] = {name: int(getattr(row, name) or 0) for name in _COUNTS}
    requests = values["requests"]
    duration = int(row.duration_ms or 0)
    values["avg_duration_ms"] = round(duration / requests, 2) if requests else 0.0
    values["total_tokens"] = values["prompt_tokens"] + values["completion_tokens"]
    return values


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
    usage = _usage_since(session.get_bind().dialect.name, since=since, user_id=user_id)
    stats = _stat_columns(usage)
    totals_row = (await session.execute(select(*stats))).one()

    day_rows = await session.execute(select(usage.c.day, *stats).group_by(usage.c.day))
    per_day = {_as_date(row.day): _stats(row) for row in day_rows}
    first = since.date()
    by_day = [
        DayUsage(date=first + timedelta(days=n), **per_day.get(first + timedelta(days=n), {}))
        for n in range(days)
    ]

    user_rows = await session.execute(
        select(usage.c.user_id, User.username, *stats)
        .outerjoin(User, User.id == usage.c.user_id)
        .group_by(usage.c.user_id, User.username)
    )
    by_user = [
        UserUsage(user_id=row.user_id, username=row.username, **_stats(row)) for row in user_rows
    ]

    key_rows = await session.execute(
        select(usage.c.api_key_id, ApiKey.prefix, *stats)
        .outerjoin(ApiKey, ApiKey.id == usage.c.api_key_id)
        .group_by(usage.c.api_key_id, ApiKey.prefix)
    )
    by_key = [KeyUsage(key_id=row.api_key_id, prefix=row.prefix, **_stats(row)) for row in key_rows]

    model_rows = await session.execute(select(usage.c.model, *stats).group_by(usage.c.model))
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
