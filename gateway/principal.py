"""Who is calling, as every layer sees it: the `Principal` value, roles and tiers, and the
`Authenticator` protocol that `gateway.auth` implements.

Kept in the core so that routers of any package can ask for a caller (`gateway.deps`) without
importing the package that resolves credentials (which builds on users and keys).
"""

from __future__ import annotations

import functools
import uuid
from dataclasses import dataclass
from enum import StrEnum
from typing import Literal, Protocol

from fastapi import Request

from gateway.errors import GatewayError


class Role(StrEnum):
    """What a user may do."""

    USER = "user"
    ADMIN = "admin"


class Tier(StrEnum):
    """Rate-limit tier (seed: free / standard / premium)."""

    FREE = "free"
    STANDARD = "standard"
    PREMIUM = "premium"


Via = Literal["jwt", "api_key", "admin_key", "anonymous"]


@dataclass(frozen=True)
class Principal:
    """The authenticated caller of one request."""

    user_id: uuid.UUID | None
    username: str
    role: str
    tier: str
    via: Via
    key_id: uuid.UUID | None = None
    # None: every model; otherwise the names an API key is limited to.
    allowed_models: tuple[str, ...] | None = None
    # Request fields an admin allowed this API key beyond the default policy (gateway.fields).
    allowed_fields: tuple[str, ...] = ()

    @functools.cached_property
    def user_ref(self) -> str | None:
        """The user id as text (for logs), None without a user."""
        return None if self.user_id is None else str(self.user_id)

    @functools.cached_property
    def key_ref(self) -> str | None:
        """The API key id as text (for logs), None without a key."""
        return None if self.key_id is None else str(self.key_id)

    @property
    def is_admin(self) -> bool:
        """True for the admin role."""
        return self.role == Role.ADMIN.value


ANONYMOUS = Principal(
    user_id=None,
    username="anonymous",
    role=Role.USER.value,
    tier=Tier.STANDARD.value,
    via="anonymous",
)
ADMIN_KEY_PRINCIPAL = Principal(
    user_id=None,
    username="admin-key",
    role=Role.ADMIN.value,
    tier=Tier.PREMIUM.value,
    via="admin_key",
)


class Authenticator(Protocol):
    """Resolves the caller of a request (implemented by `gateway.auth.principal`)."""

    async def principal(self, request: Request) -> Principal:
        """The caller: 401 without valid credentials (anonymous when auth is not required)."""
        ...

    async def admin(self, request: Request) -> Principal:
        """An admin caller: 401 without credentials, 403 without the admin role, 429/503 from
        the admin API's limit."""
        ...


def missing_credentials() -> GatewayError:
    """401 for a request that sent no credentials."""
    return GatewayError(
        401,
        "Missing credentials: send 'Authorization: Bearer <access token or API key>'.",
        code="missing_credentials",
        headers={"WWW-Authenticate": "Bearer"},
    )


def admin_required() -> GatewayError:
    """403 for an authenticated caller without the admin role."""
    return GatewayError(403, "This route needs the admin role.", code="admin_required")
