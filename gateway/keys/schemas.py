"""Request and response bodies of the key routes; no body ever carries a digest."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StringConstraints
from pydantic_core import PydanticCustomError

from gateway.keys.models import ApiKey
from gateway.keys.service import as_utc, key_status
from gateway.text import NoNul
from gateway.users.models import User

TierName = Literal["free", "standard", "premium"]
ModelName = Annotated[
    str, StringConstraints(strip_whitespace=True, min_length=1, max_length=256), NoNul
]
ModelList = Annotated[list[ModelName], Field(max_length=64)]
Description = Annotated[str, StringConstraints(max_length=500), NoNul]


def _date_time_text(value: object) -> object:
    # Lax pydantic reads a number as Unix seconds; an expiry is written as a date-time here
    # ("2027-01-31T00:00:00Z"), so a number is a mistake to report, not to reinterpret.
    if isinstance(value, int | float):
        raise PydanticCustomError(
            "datetime_type",
            "Input should be an ISO 8601 date-time string such as 2027-01-31T00:00:00Z",
        )
    return value


IsoDateTime = Annotated[datetime, BeforeValidator(_date_time_text)]


class _Body(BaseModel):
    # Unknown fields (role, scopes, user ids where none belong, ...) are refused, not ignored.
    model_config = ConfigDict(extra="forbid")


class MyKeyCreate(_Body):
    """A key for yourself: tier up to your own (default: your tier), models within your own."""

    tier: TierName | None = None
    description: Description = ""
    expires_at: IsoDateTime | None = Field(default=None, description="None: never expires.")
    allowed_models: ModelList | None = Field(
        default=None, description="None: every model you may use."
    )


class AdminKeyCreate(MyKeyCreate):
    """A key for any user. `user_id` is a user's id or username; an unknown name creates a
    service account (no password) of that name."""

    user_id: Annotated[
        str, StringConstraints(strip_whitespace=True, min_length=1, max_length=64), NoNul
    ]

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {"user_id": "dev-team", "tier": "premium", "description": "Development team key"}
            ]
        },
    )


class AdminKeyUpdate(_Body):
    """Fields to change; absent fields stay, null clears expires_at / allowed_models."""

    description: Description | None = None
    tier: TierName | None = None
    expires_at: IsoDateTime | None = None
    allowed_models: ModelList | None = None


class KeyInfo(BaseModel):
    """A key as listed: never the key itself, never its digest."""

    id: uuid.UUID
    prefix: str = Field(description="The first characters of the key, to recognise it.")
    user_id: uuid.UUID
    username: str
    tier: TierName
    description: str
    allowed_models: list[str] | None
    expires_at: datetime | None
    revoked_at: datetime | None
    last_used_at: datetime | None
    created_at: datetime
    status: Literal["active", "revoked", "expired"]
    is_active: bool

    @classmethod
    def of(cls, key: ApiKey, user: User) -> KeyInfo:
        """Shape one row for a reply."""
        status = key_status(key)
        return cls(
            id=key.id,
            prefix=key.prefix,
            user_id=user.id,
            username=user.username,
            tier=key.tier,
            description=key.description,
            allowed_models=key.allowed_models,
            expires_at=as_utc(key.expires_at),
            revoked_at=as_utc(key.revoked_at),
            last_used_at=as_utc(key.last_used_at),
            created_at=as_utc(key.created_at) or key.created_at,
            status=status,
            is_active=status == "active",
        )


class KeyCreated(KeyInfo):
    """A new key. `key` is shown this once: only its digest is stored."""

    key: str


class KeyList(BaseModel):
    """A list of keys."""

    data: list[KeyInfo]
