"""Request and response bodies of the key routes; no body ever carries a digest."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StringConstraints,
    WithJsonSchema,
    field_validator,
)
from pydantic.json_schema import SkipJsonSchema
from pydantic_core import PydanticCustomError

from gateway.fields import GRANTABLE_FIELD_REF, MAX_FIELD_NAME_CHARS, check_grant
from gateway.keys.models import ApiKey
from gateway.keys.service import as_utc, key_status
from gateway.text import NoNul, NotBlank
from gateway.users.models import User
from gateway.users.schemas import Username

TierName = Literal["free", "standard", "premium"]
# Stripped by the service (keys.service._normalize_models), so checked here as sent.
ModelName = Annotated[str, StringConstraints(min_length=1, max_length=256), NoNul, NotBlank]
# An empty list would allow no model at all: null is how every model is allowed.
ModelList = Annotated[list[ModelName], Field(min_length=1, max_length=64)]
# A request field an admin allows a key beyond the default policy (gateway.fields); the
# document's GrantableFieldName states the same rules.
FieldName = Annotated[
    str,
    StringConstraints(min_length=1, max_length=MAX_FIELD_NAME_CHARS, pattern="[A-Za-z0-9]"),
    AfterValidator(check_grant),
    WithJsonSchema({"$ref": GRANTABLE_FIELD_REF}),
]
FieldList = Annotated[list[FieldName], Field(max_length=64)]
_FIELDS = (
    "Request fields this key may send beyond the default policy (e.g. `chat_template`); "
    "never a routing field such as `api_base`. null or []: the default policy."
)
_EXPIRY = "Must be in the future (a past one is a 400 invalid_expiry); null: never expires."
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
    expires_at: IsoDateTime | None = Field(default=None, description=_EXPIRY)
    allowed_models: ModelList | None = Field(
        default=None, description="null: every model you may use."
    )


class AdminKeyCreate(MyKeyCreate):
    """A key for any user. `user_id` is a user's id or username; an unknown name creates a
    service account (no password) of that name."""

    # A user id (a UUID) fits the username pattern too.
    user_id: Username
    # Admins only: MyKeyCreate has no such field, so a user cannot widen their own key.
    allowed_fields: FieldList | None = Field(default=None, description=_FIELDS)

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {"user_id": "dev-team", "tier": "premium", "description": "Development team key"}
            ]
        },
    )


class AdminKeyUpdate(_Body):
    """Fields to change; absent fields stay, null clears expires_at / allowed_models /
    allowed_fields."""

    description: Description | None = None
    # Absent keeps the tier; null is refused (a key always has one), and not offered.
    tier: TierName | SkipJsonSchema[None] = None
    expires_at: IsoDateTime | None = Field(default=None, description=_EXPIRY)
    allowed_models: ModelList | None = Field(
        default=None, description="null: every model the owner may use."
    )
    allowed_fields: FieldList | None = Field(default=None, description=_FIELDS)

    @field_validator("tier")
    @classmethod
    def _tier_not_null(cls, tier: TierName | None) -> TierName:
        # Runs only for a tier that was sent: the default (absent) is not validated.
        if tier is None:
            raise ValueError("tier cannot be null; leave it out to keep the key's tier")
        return tier


class KeyInfo(BaseModel):
    """A key as listed: never the key itself, never its digest."""

    id: uuid.UUID
    prefix: str = Field(description="The first characters of the key, to recognise it.")
    user_id: uuid.UUID
    username: str
    tier: TierName
    description: str
    allowed_models: list[str] | None
    allowed_fields: list[str] = Field(
        description="Request fields an admin allowed this key beyond the default policy."
    )
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
            allowed_fields=key.allowed_fields or [],
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
