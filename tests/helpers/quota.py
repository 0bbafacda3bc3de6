"""Limits and usage through a real gateway: users, keys, chats and the rate-limit headers."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx

from gateway.settings import Settings
from tests.helpers.app import make_settings
from tests.helpers.auth import ADMIN_PASSWORD, USER_PASSWORD, bearer
from tests.helpers.proxy import (
    ADMIN_KEY,
    HELLO,
    Gateway,
    gateway,
    sim_profile,
    write_profiles,
)

__all__ = ["ADMIN_KEY", "ADMIN_PASSWORD", "HELLO", "USER_PASSWORD", "Gateway", "bearer"]


ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}


# Generous limits for every tier unless a test sets its own (0 means unlimited).
_UNLIMITED = {
    f"RATE_LIMIT_{tier}_{what}": 0
    for tier in ("FREE", "STANDARD", "PREMIUM")
    for what in ("PER_MINUTE", "PER_HOUR", "TOKENS_PER_MINUTE")
}


def quota_settings(
    database_url: str,
    *,
    profiles: dict[str, dict[str, Any]] | None = None,
    default: str = "sim-a",
    **overrides: Any,
) -> Settings:
    """Auth required, a first admin (ADMIN_PASSWORD) and the admin key, the simulator profiles
    (default: one, `sim-a`), no tier limits unless overridden. Each call has its own STATE_DIR,
    so two gateways made from two calls run two engines side by side."""
    values: dict[str, Any] = {
        "DATABASE_URL": database_url,
        "REQUIRE_AUTH": True,
        "ADMIN_PASSWORD": ADMIN_PASSWORD,
        "ADMIN_API_KEY": ADMIN_KEY,
        "LOGIN_RATE_LIMIT_PER_MINUTE": 10_000,
        "MODEL_PROFILES": str(write_profiles(profiles or {"sim-a": sim_profile("sim-a")}, default)),
        "ENGINE": "auto",
        "DEFAULT_PROFILE": default,
        "LOG_LEVEL": "WARNING",
        **_UNLIMITED,
    }
    values.update(overrides)
    return make_settings(**values)


@asynccontextmanager
async def quota_gateway(settings: Settings) -> AsyncIterator[Gateway]:
    """A served gateway whose engine is ready."""
    async with gateway(settings) as served:
        yield served


async def create_user(
    http: httpx.AsyncClient, username: str, *, tier: str = "standard", role: str = "user"
) -> dict[str, Any]:
    """A user with USER_PASSWORD, made through the admin API."""
    reply = await http.post(
        "/admin/api/users",
        json={"username": username, "password": USER_PASSWORD, "tier": tier, "role": role},
        headers=ADMIN,
    )
    assert reply.status_code == 201, reply.text
    return dict(reply.json())


async def login(http: httpx.AsyncClient, username: str, password: str = USER_PASSWORD) -> str:
    """Log in; the access token."""
    reply = await http.post("/api/auth/login", json={"username": username, "password": password})
    assert reply.status_code == 200, reply.text
    return str(reply.json()["access_token"])


async def create_key(http: httpx.AsyncClient, owner: str, **fields: Any) -> dict[str, Any]:
    """A key for `owner` (a username; unknown names become service accounts) through the admin
    API; the reply, with the raw key in `key`."""
    reply = await http.post("/admin/api/keys", json={"user_id": owner, **fields}, headers=ADMIN)
    assert reply.status_code == 201, reply.text
    created = dict(reply.json())
    assert created["key"].startswith("sk-vcg-")
    return created


def chat_body(
    model: str | None = "sim-a", *, max_tokens: int = 5, stream: bool = False, **extra: Any
) -> dict[str, Any]:
    """A chat request that generates exactly `max_tokens` tokens (the simulator honours
    ignore_eos)."""
    body: dict[str, Any] = {
        "messages": HELLO,
        "max_tokens": max_tokens,
        "ignore_eos": True,
        "stream": stream,
        **extra,
    }
    if model is not None:
        body["model"] = model
    return body


async def chat(
    http: httpx.AsyncClient, headers: dict[str, str], model: str | None = "sim-a", **options: Any
) -> httpx.Response:
    """POST /v1/chat/completions (a stream is read to its end)."""
    return await http.post(
        "/v1/chat/completions", json=chat_body(model, **options), headers=headers
    )


def sse_events(response: httpx.Response) -> list[Any]:
    """The data of every event of a relayed stream, JSON decoded ('[DONE]' kept as is)."""
    events: list[Any] = []
    for line in response.text.splitlines():
        if line.startswith("data: "):
            data = line[len("data: ") :]
            events.append(data if data == "[DONE]" else json.loads(data))
    return events


def error_code(response: httpx.Response) -> str | None:
    """The `error.code` of a gateway error body."""
    code = response.json()["error"]["code"]
    return None if code is None else str(code)


def remaining(response: httpx.Response, rule: str = "Minute") -> int:
    """X-RateLimit-Remaining-<rule> of a response."""
    return int(response.headers[f"X-RateLimit-Remaining-{rule}"])
