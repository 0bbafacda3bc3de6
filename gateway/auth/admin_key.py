"""The admin key that guards management routes until user accounts exist (ADMIN_API_KEY)."""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Request

from gateway.deps import SettingsDep
from gateway.errors import GatewayError

_BEARER = "bearer "


def _bearer_token(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    if header[: len(_BEARER)].lower() != _BEARER:
        return None
    return header[len(_BEARER) :].strip() or None


def require_admin(request: Request, settings: SettingsDep) -> None:
    """Allow the request only with `Authorization: Bearer <ADMIN_API_KEY>`."""
    expected = settings.ADMIN_API_KEY
    if expected is None:
        raise GatewayError(
            403,
            "Model management is disabled: set ADMIN_API_KEY to enable it.",
            code="admin_disabled",
        )
    token = _bearer_token(request)
    if token is None:
        raise GatewayError(
            401,
            "Missing credentials: send 'Authorization: Bearer <admin key>'.",
            code="missing_credentials",
            headers={"WWW-Authenticate": "Bearer"},
        )
    # Constant-time comparison: the time taken says nothing about how much of the key matched.
    if not hmac.compare_digest(token.encode(), expected.get_secret_value().encode()):
        raise GatewayError(
            401,
            "Invalid admin key.",
            code="invalid_credentials",
            headers={"WWW-Authenticate": "Bearer"},
        )


AdminDep = Annotated[None, Depends(require_admin)]
