"""The usage_records table."""

from __future__ import annotations

import uuid
from datetime import datetime

from sqlalchemy import BigInteger, Index, Integer, String, Uuid
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
