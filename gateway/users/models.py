"""The users table."""

from __future__ import annotations

import uuid
from datetime import datetime

from sqlalchemy import Boolean, CheckConstraint, String, Uuid
from sqlalchemy.orm import Mapped, mapped_column

from gateway.db import Base, TimestampMixin, UtcDateTime, new_id
from gateway.principal import Role, Tier


class User(TimestampMixin, Base):
    """A person (or a service account without a password); passwords only as argon2id hashes."""

    __tablename__ = "users"
    __table_args__ = (
        CheckConstraint("role IN ('user', 'admin')", name="role_known"),
        CheckConstraint("tier IN ('free', 'standard', 'premium')", name="tier_known"),
    )

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=new_id)
    username: Mapped[str] = mapped_column(String(64), unique=True)
    email: Mapped[str | None] = mapped_column(String(320), default=None)
    # NULL for service accounts, which authenticate only with API keys.
    password_hash: Mapped[str | None] = mapped_column(String(255), default=None)
    role: Mapped[str] = mapped_column(String(16), default=Role.USER.value)
    tier: Mapped[str] = mapped_column(
        String(16), default=Tier.STANDARD.value, server_default=Tier.STANDARD.value
    )
    is_active: Mapped[bool] = mapped_column(Boolean, default=True)
    last_login_at: Mapped[datetime | None] = mapped_column(UtcDateTime(), default=None)
