"""Request and response shapes for user management. No shape here has a password hash."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StringConstraints,
    model_validator,
)

from gateway.principal import Role, Tier
from gateway.text import WHITESPACE_CLASS, NoNul
from gateway.users.passwords import MAX_PASSWORD_CHARS
from gateway.users.service import MIN_PASSWORD_CHARS

Username = Annotated[
    str, StringConstraints(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9._@-]*$")
]
NewPassword = Annotated[
    str, StringConstraints(min_length=MIN_PASSWORD_CHARS, max_length=MAX_PASSWORD_CHARS)
]
# No whitespace (as every regex engine reads it: see gateway.text), no NUL, one @, a dot after.
_EMAIL_PART = f"[^@\\x00{WHITESPACE_CLASS}]+"
Email = Annotated[
    str,
    StringConstraints(max_length=320, pattern=f"^{_EMAIL_PART}@{_EMAIL_PART}\\.{_EMAIL_PART}$"),
    NoNul,
]


class UserCreate(BaseModel):
    """A new user; without a password it is a service account that uses API keys only."""

    model_config = ConfigDict(extra="forbid")

    username: Username
    password: NewPassword | None = None
    role: Role = Role.USER
    tier: Tier = Tier.STANDARD
    email: Email | None = None


class UserUpdate(BaseModel):
    """Fields an admin may change; omitted (or null) fields stay as they are, so `{}` changes
    nothing and answers the user as it is."""

    model_config = ConfigDict(extra="forbid")

    # Strict: 0 or "no" is an error, not a silent deactivation.
    is_active: StrictBool | None = None
    role: Role | None = None
    tier: Tier | None = None


class UserView(BaseModel):
    """A user as the API shows it."""

    model_config = ConfigDict(from_attributes=True)

    id: uuid.UUID
    username: str
    email: str | None
    role: Role
    tier: Tier
    is_active: bool
    has_password: bool = Field(description="False for service accounts (API keys only)")
    created_at: datetime
    last_login_at: datetime | None

    @model_validator(mode="before")
    @classmethod
    def _from_user(cls, value: object) -> object:
        # Read from the ORM row without ever copying the hash itself.
        if hasattr(value, "password_hash"):
            return {
                name: getattr(value, name)
                for name in (
                    "id",
                    "username",
                    "email",
                    "role",
                    "tier",
                    "is_active",
                    "created_at",
                    "last_login_at",
                )
            } | {"has_password": value.password_hash is not None}
        return value


class UserList(BaseModel):
    """A page of users."""

    data: list[UserView]
    total: int
