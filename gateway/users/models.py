"""The users table and refresh tokens (rotation families)."""

from __future__ import annotations

import uuid
from datetime import datetime
from enum import StrEnum

from sqlalchemy import Boolean, CheckConstraint, ForeignKey, Index, String, Uuid
from sqlalchemy.orm import Mapped, mapped_column

from gateway.db import Base, TimestampMixin, UtcDateTime, new_id, utcnow


class Role(StrEnum):
    """What a user may do."""

    USER = "user"
    ADMIN = "admin"


class Tier(StrEnum):
    """Rate-limit tier (seed: free / standard / premium)."""

    FREE = "free"
    STANDARD = "standard"
    PREMIUM = "premium"


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


class RefreshToken(Base):
    """One issued refresh token; a token works once, and reuse revokes its whole family."""

    __tablename__ = "refresh_tokens"
    __table_args__ = (Index("ix_refresh_tokens_family", "family_id"),)

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=new_id)
    user_id: Mapped[uuid.UUID] = mapped_column(
        Uuid, ForeignKey("users.id", ondelete="CASCADE"), index=True
    )
    family_id: Mapped[uuid.UUID] = mapped_column(Uuid)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime(), default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(UtcDateTime())
    used_at: Mapped[datetime | None] = mapped_column(UtcDateTime(), default=None)
    revoked_at: Mapped[datetime | None] = mapped_column(UtcDateTime(), default=None)
