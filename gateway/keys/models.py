"""The api_keys table."""

from __future__ import annotations

import uuid
from datetime import datetime

from sqlalchemy import JSON, CheckConstraint, ForeignKey, String, Uuid
from sqlalchemy.orm import Mapped, mapped_column

from gateway.db import Base, TimestampMixin, UtcDateTime, new_id


class ApiKey(TimestampMixin, Base):
    """An API key: only its SHA-256 digest and a short display prefix are stored."""

    __tablename__ = "api_keys"
    __table_args__ = (
        CheckConstraint("tier IN ('free', 'standard', 'premium')", name="tier_known"),
    )

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=new_id)
    user_id: Mapped[uuid.UUID] = mapped_column(
        Uuid, ForeignKey("users.id", ondelete="CASCADE"), index=True
    )
    prefix: Mapped[str] = mapped_column(String(24))
    digest: Mapped[str] = mapped_column(String(64), unique=True)
    tier: Mapped[str] = mapped_column(String(16))
    description: Mapped[str] = mapped_column(String(500), default="")
    # None: every model; else the served names (or aliases) this key may use.
    allowed_models: Mapped[list[str] | None] = mapped_column(JSON, default=None)
    # None: the default policy; else request fields an admin allowed this key (gateway.fields).
    allowed_fields: Mapped[list[str] | None] = mapped_column(JSON, default=None)
    expires_at: Mapped[datetime | None] = mapped_column(UtcDateTime(), default=None)
    revoked_at: Mapped[datetime | None] = mapped_column(UtcDateTime(), default=None)
    last_used_at: Mapped[datetime | None] = mapped_column(UtcDateTime(), default=None)
