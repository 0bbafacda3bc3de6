"""Usage retention: raw rows older than USAGE_RETENTION_DAYS become daily totals, then go.

Each batch is one short transaction that DELETEs up to `batch_size` of the oldest expired rows
with RETURNING, adds exactly the rows it deleted to their day's totals (an upsert per group) and
commits both together. So a row is counted once whatever happens: a crash or an error rolls the
delete back with the sums, a second run finds nothing left to add, and two gateway processes
pruning at once never count a row twice (a row is returned by the one DELETE that removed it; on
Postgres `FOR UPDATE SKIP LOCKED` also hands them disjoint batches instead of making one wait).
A background task runs it every USAGE_PRUNE_INTERVAL_S with a pause between batches, so neither
a request nor the usage writer waits long behind it.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime
from typing import Any

from sqlalchemy import Table, delete, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from gateway.db import utcnow
from gateway.logging import get_logger
from gateway.usage.models import UsageDaily, UsageRecord
from gateway.usage.service import range_start

log = get_logger(__name__)

_RAW: Table = UsageRecord.metadata.tables[UsageRecord.__tablename__]
_DAILY: Table = UsageDaily.metadata.tables[UsageDaily.__tablename__]
_SUMMED = ("requests", "errors", "prompt_tokens", "completion_tokens", "duration_ms_sum")
# Between two batches: other writers (the usage recorder, SQLite's single writer) get a turn.
DEFAULT_PAUSE_S = 0.05


@dataclass(frozen=True)
class _Group:
    day: date
    user_id: uuid.UUID | None
    api_key_id: uuid.UUID | None
    endpoint: str
    model: str | None
    route: str

    def bucket(self) -> str:
        """The digest naming this group in usage_daily.bucket."""
        values = [
            self.day.isoformat(),
            None if self.user_id is None else str(self.user_id),
            None if self.api_key_id is None else str(self.api_key_id),
            self.endpoint,
            self.model,
            self.route,
        ]
        return hashlib.sha256(json.dumps(values).encode()).hexdigest()


def retention_cutoff(*, retention_days: int, now: datetime) -> datetime:
    """Rows created before this instant are expired: the raw rows kept are exactly the range
    `?days=retention_days` of the usage API covers (UTC days, today included)."""
    return range_start(days=retention_days, now=now)


def _totals(rows: Sequence[Any]) -> list[dict[str, Any]]:
    """The deleted rows summed per group, as usage_daily rows, ordered by bucket (upserts in one
    order everywhere: two processes adding to the same groups cannot deadlock)."""
    sums: dict[_Group, dict[str, int]] = {}
    for row in rows:
        group = _Group(
            day=row.created_at.astimezone(UTC).date(),
            user_id=row.user_id,
            api_key_id=row.api_key_id,
            endpoint=row.endpoint,
            model=row.model,
            route=row.route,
        )
        total = sums.setdefault(group, dict.fromkeys(_SUMMED, 0))
        total["requests"] += 1
        total["errors"] += 1 if row.status_code >= 400 else 0
        total["prompt_tokens"] += row.prompt_tokens
        total["completion_tokens"] += row.completion_tokens
        total["duration_ms_sum"] += row.duration_ms
    values = [
        {
            "bucket": group.bucket(),
            "day": group.day,
            "user_id": group.user_id,
            "api_key_id": group.api_key_id,
            "endpoint": group.endpoint,
            "model": group.model,
            "route": group.route,
            **total,
        }
        for group, total in sums.items()
    ]
    return sorted(values, key=lambda value: str(value["bucket"]))


def _upsert(dialect: str) -> Any:
    """INSERT into usage_daily that adds to the group's row when it exists."""
    insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
    statement = insert(_DAILY)
    return statement.on_conflict_do_update(
        index_elements=[_DAILY.c.bucket],
        set_={name: _DAILY.c[name] + statement.excluded[name] for name in _SUMMED},
    )


async def roll_up_batch(
    sessions: async_sessionmaker[AsyncSession], *, before: datetime, batch_size: int
) -> int:
    """Move up to `batch_size` of the oldest rows created before `before` into the daily totals,
    in one transaction. Returns how many raw rows were deleted (and added)."""
    async with sessions() as session, session.begin():
        dialect = session.get_bind().dialect.name
        oldest = (
            select(_RAW.c.id)
            .where(_RAW.c.created_at < before)
            .order_by(_RAW.c.created_at)
            .limit(batch_size)
        )
        if dialect == "postgresql":
            oldest = oldest.with_for_update(skip_locked=True)
        deleted = (
            await session.execute(
                delete(_RAW)
                .where(_RAW.c.id.in_(oldest.scalar_subquery()))
                .returning(
                    _RAW.c.created_at, _RAW.c.user_id, _RAW.c.api_key_id, _RAW.c.endpoint,
                    _RAW.c.model, _RAW.c.route, _RAW.c.status_code, _RAW.c.duration_ms,
                    _RAW.c.prompt_tokens, _RAW.c.completion_tokens,
                )
            )
        ).all()  # fmt: skip
        if deleted:
            await session.execute(_upsert(dialect), _totals(deleted))
    return len(deleted)


async def prune_usage(
    sessions: async_sessionmaker[AsyncSession],
    *,
    retention_days: int,
    batch_size: int,
    now: datetime | None = None,
    pause_s: float = DEFAULT_PAUSE_S,
) -> int:
    """Roll up and delete every raw row older than the retention, batch by batch. Returns the
    number of rows moved. A short batch ends the run: what is left then (rows another process
    holds right now) is picked up by the next run."""
    if retention_days < 1:
        raise ValueError("retention_days must be >= 1 (0 means: never prune; don't call this)")
    before = retention_cutoff(retention_days=retention_days, now=now or utcnow())
    moved = 0
    while True:
        count = await roll_up_batch(sessions, before=before, batch_size=batch_size)
        moved += count
        if count < batch_size:
            return moved
        await asyncio.sleep(pause_s)


async def prune_forever(
    sessions: async_sessionmaker[AsyncSession],
    *,
    retention_days: int,
    batch_size: int,
    interval_s: float,
) -> None:
    """Run `prune_usage` now and then every `interval_s`; a database error only skips a run."""
    while True:
        try:
            moved = await prune_usage(
                sessions, retention_days=retention_days, batch_size=batch_size
            )
        except (SQLAlchemyError, OSError, TimeoutError) as exc:
            # The class name only: a driver message may quote the statement and its values.
            log.warning("usage_prune_failed", error=type(exc).__name__)
        else:
            if moved:
                log.info("usage_rolled_up", rows=moved, retention_days=retention_days)
        await asyncio.sleep(interval_s)
