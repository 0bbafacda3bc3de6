"""Request and response shapes of login, refresh, logout and the caller's own account."""

from __future__ import annotations

import uuid
from typing import Annotated, Any, Literal
from urllib.parse import parse_qsl

import orjson
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ConfigDict, StringConstraints, ValidationError

from gateway.body import check_json_shape, orjson_refusal
from gateway.errors import GatewayError
from gateway.principal import Role, Tier
from gateway.text import NoNul
from gateway.users.passwords import MAX_PASSWORD_CHARS
from gateway.users.schemas import Email, NewPassword

MAX_TOKEN_CHARS = 4096
Token = Annotated[str, StringConstraints(min_length=1, max_length=MAX_TOKEN_CHARS), NoNul]

# OAuth2 password-grant fields a client may send besides username and password (RFC 6749 4.3).
_OAUTH2_EXTRA_FIELDS = frozenset({"grant_type", "scope", "client_id", "client_secret"})


class LoginRequest(BaseModel):
    """Username and password."""

    model_config = ConfigDict(extra="forbid")

    username: Annotated[str, StringConstraints(min_length=1, max_length=64), NoNul]
    password: Annotated[str, StringConstraints(min_length=1, max_length=MAX_PASSWORD_CHARS)]


class TokenResponse(BaseModel):
    """A token pair (OAuth2 shape): send the access token as `Authorization: Bearer`."""

    access_token: str
    refresh_token: str
    token_type: Literal["bearer"] = "bearer"  # noqa: S105 (the OAuth2 token type, not a secret)
    expires_in: int


class RefreshRequest(BaseModel):
    """The refresh token to exchange (it works once)."""

    model_config = ConfigDict(extra="forbid")

    refresh_token: Token


class LogoutRequest(BaseModel):
    """The session to end; without a refresh token, the session of the access token sent."""

    model_config = ConfigDict(extra="forbid")

    refresh_token: Token | None = None


class MeView(BaseModel):
    """The caller's own account (id is null for the admin key and anonymous callers)."""

    id: uuid.UUID | None
    username: str
    role: Role
    tier: Tier
    email: str | None
    is_active: bool
    via: Literal["jwt", "api_key", "admin_key", "anonymous"]


class MeUpdate(BaseModel):
    """What a user may change about themselves: email and password. Nothing else."""

    model_config = ConfigDict(extra="forbid")

    email: Email | None = None
    current_password: (
        Annotated[str, StringConstraints(min_length=1, max_length=MAX_PASSWORD_CHARS)] | None
    ) = None
    new_password: NewPassword | None = None


_LOGIN_SCHEMA = LoginRequest.model_json_schema()
LOGIN_OPENAPI: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": _LOGIN_SCHEMA},
            "application/x-www-form-urlencoded": {
                "schema": {
                    "type": "object",
                    "required": ["username", "password"],
                    "additionalProperties": False,
                    "properties": {
                        # The same fields as the JSON body, checked by the same model.
                        **_LOGIN_SCHEMA["properties"],
                        "grant_type": {"type": "string", "enum": ["password"]},
                        "scope": {"type": "string"},
                        "client_id": {"type": "string"},
                        "client_secret": {"type": "string"},
                    },
                }
            },
        },
    }
}


def parse_login(content_type: str, body: bytes, *, max_json_depth: int) -> LoginRequest:
    """A login from a JSON body (bounded like every JSON body: `check_json_shape`) or an OAuth2
    password form; 400 for anything else."""
    media = content_type.split(";", 1)[0].strip().lower()
    data: Any
    if media == "application/x-www-form-urlencoded":
        data = _form_fields(body)
    elif media in ("application/json", ""):
        try:
            data = orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            raise orjson_refusal(exc, max_json_depth) from None
        check_json_shape(data, max_depth=max_json_depth)
    else:
        raise GatewayError(
            415,
            "Send the login as application/json or application/x-www-form-urlencoded.",
            code="unsupported_media_type",
        )
    try:
        return LoginRequest.model_validate(data)
    except ValidationError as exc:
        # No inputs in the errors: they would hold the password.
        errors = exc.errors(include_url=False, include_input=False, include_context=False)
        raise RequestValidationError(
            [{**err, "loc": ("body", *err["loc"])} for err in errors]
        ) from None


def _form_fields(body: bytes) -> dict[str, str]:
    try:
        pairs = parse_qsl(body.decode("utf-8"), keep_blank_values=True, strict_parsing=False)
    except (UnicodeDecodeError, ValueError):
        raise GatewayError(400, "The form body is malformed.", code="invalid_form") from None
    fields: dict[str, str] = {}
    for name, value in pairs:
        if name in fields:
            raise GatewayError(
                400, f"The form field '{name}' appears twice.", code="invalid_form", param=name
            )
        fields[name] = value
    grant_type = fields.get("grant_type")
    if grant_type not in (None, "password"):
        raise GatewayError(
            400,
            "Only grant_type=password is supported.",
            code="unsupported_grant_type",
            param="grant_type",
        )
    return {name: value for name, value in fields.items() if name not in _OAUTH2_EXTRA_FIELDS}
