"""The usage_records table (one row per request) and usage_daily (rolled-up days)."""

from __future__ import annotations

import uuid
from datetime import date, datetime

from sqlalchemy import BigInteger, Date, Index, Integer, String, Uuid
from sqlalchemy.orm import Mapped, mapped_column

from gateway.db import Base, UtcDateTime, utcnow

# SQLite only autoincrements INTEGER PRIMARY KEY; Postgres gets a BIGINT identity.
_BIG_ID = BigInteger().with_variant(Integer(), "sqlite")


class UsageRecord(Base):
    """One proxied request: who, what, how long, how many tokens, where it ran."""

    __tablename__ = "usage_records"
    __table_args__ = (
        Index("ix_usage_records_user_created", "user_id", "created_at"),
        Index("ix_usage_records_key_created", "api_key_id", "created_at"),
    )

    id: Mapped[int] = mapped_column(_BIG_ID, primary_key=True, autoincrement=True)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime(), default=utcnow, index=True)
    request_id: Mapped[str] = mapped_column(String(128), default="")
    user_id: Mapped[uuid.UUID | None] = mapped_column(Uuid, default=None)
    api_key_id: Mapped[uuid.UUID | None] = mapped_column(Uuid, default=None)
    endpoint: Mapped[str] = mapped_column(String(64))
    model: Mapped[str | None] = mapped_column(String(256), default=None)
    status_code: Mapped[int] = mapped_column(Integer)
    duration_ms: Mapped[int] = mapped_column(Integer)
    prompt_tokens: Mapped[int] = mapped_column(Integer, default=0)
    completion_tokens: Mapped[int] = mapped_column(Integer, default=0)
    route: Mapped[str] = mapped_column(String(16), default="local")


class UsageDaily(Base):
    """Usage rows older than USAGE_RETENTION_DAYS, summed per UTC day and per who/what/where.

    One row per (day, user, key, model, endpoint, route); `bucket` is a digest of those six
    values, so a rollup adds to the row of its group with one upsert (a unique key over nullable
    columns would let NULLs repeat). Counts are 64-bit: a busy day overflows 32 bits of tokens.
    """

    __tablename__ = "usage_daily"
    __table_args__ = (
        Index("ix_usage_daily_user_day", "user_id", "day"),
        Index("ix_usage_daily_key_day", "api_key_id", "day"),
    )

    id: Mapped[int] = mapped_column(_BIG_ID, primary_key=True, autoincrement=True)
    bucket: Mapped[str] = mapped_column(String(64), unique=True)
    day: Mapped[date] = mapped_column(Date, index=True)
    user_id: Mapped[uuid.UUID | None] = mapped_column(Uuid, default=None)
    api_key_id: Mapped[uuid.UUID | None] = mapped_column(Uuid, default=None)
    endpoint: Mapped[str] = mapped_column(String(64))
    model: Mapped[str | None] = mapped_column(String(256), default=None)
    route: Mapped[str] = mapped_column(String(16))
    requests: Mapped[int] = mapped_column(BigInteger, default=0)
    errors: Mapped[int] = mapped_column(BigInteger, default=0)
    prompt_tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    completion_tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    duration_ms_sum: Mapped[int] = mapped_column(BigInteger, default=0)
