"""Identity tests: an app with accounts, logins, bearer headers, the error envelope."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
from fastapi import FastAPI
from sqlalchemy import select

from gateway.db import create_engine, create_session_factory
from gateway.settings import Settings
from gateway.users.models import User
from tests.helpers.app import make_settings, running_app

ADMIN_PASSWORD = "adm1n-Pass-for-tests-9f2c"


USER_PASSWORD = "us3r-Pass-for-tests-4b7e"


def auth_settings(database_url: str, **overrides: Any) -> Settings:
    """Production settings with auth required and a first admin from ADMIN_PASSWORD."""
    values: dict[str, Any] = {
        "REQUIRE_AUTH": True,
        "ADMIN_PASSWORD": ADMIN_PASSWORD,
        "DATABASE_URL": database_url,
        # Many logins from one test client; the login limit has its own tests.
        "LOGIN_RATE_LIMIT_PER_MINUTE": 10_000,
    }
    values.update(overrides)
    return make_settings(**values)


class ResponseLog:
    """Every response body and header the tests saw; none may carry a password hash."""

    def __init__(self) -> None:
        self.texts: list[str] = []

    async def record(self, response: httpx.Response) -> None:
        """httpx response hook."""
        await response.aread()
        headers = "\n".join(f"{k}: {v}" for k, v in response.headers.items())
        self.texts.append(f"{response.request.url}\n{headers}\n{response.text}")

    def assert_no_hashes(self, stored_hashes: list[str]) -> None:
        """No response mentions argon2 or contains (a piece of) a stored hash."""
        for text in self.texts:
            assert "argon2" not in text.lower(), text
            for stored in stored_hashes:
                # The salt+digest part of a PHC string is unique enough to catch partial leaks.
                assert stored.rsplit("$", 2)[-1] not in text, text
                assert stored.rsplit("$", 2)[-2] not in text, text


@asynccontextmanager
async def auth_app(
    settings: Settings, log: ResponseLog | None = None
) -> AsyncIterator[tuple[FastAPI, httpx.AsyncClient]]:
    """`running_app` whose client records every response, then checks none leaks a hash."""
    log = log or ResponseLog()
    async with running_app(settings) as (app, client):
        client.event_hooks["response"].append(log.record)
        yield app, client
    log.assert_no_hashes(await stored_hashes(settings.DATABASE_URL))


async def stored_hashes(url: str) -> list[str]:
    """Every password hash in the database."""
    engine = create_engine(url, pool_size=1)
    try:
        async with create_session_factory(engine)() as session:
            rows = await session.scalars(select(User.password_hash))
            return [h for h in rows if h is not None]
    finally:
        await engine.dispose()


async def login(
    client: httpx.AsyncClient, username: str, password: str, path: str = "/api/auth/login"
) -> dict[str, Any]:
    """Log in with JSON; the token pair."""
    response = await client.post(path, json={"username": username, "password": password})
    assert response.status_code == 200, response.text
    return dict(response.json())


def bearer(token: str) -> dict[str, str]:
    """An Authorization header."""
    return {"Authorization": f"Bearer {token}"}


async def create_user(
    client: httpx.AsyncClient,
    admin_token: str,
    username: str,
    password: str | None = USER_PASSWORD,
    **fields: Any,
) -> dict[str, Any]:
    """Create a user through the admin API."""
    response = await client.post(
        "/admin/api/users",
        json={"username": username, "password": password, **fields},
        headers=bearer(admin_token),
    )
    assert response.status_code == 201, response.text
    return dict(response.json())


def assert_openai_error(response: httpx.Response, status: int, code: str | None = None) -> None:
    """The gateway's OpenAI-shaped error envelope with this status (and code)."""
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    if code is not None:
        assert error["code"] == code, error
    if status == 401:
        assert error["type"] == "authentication_error"
        assert response.headers["www-authenticate"].startswith("Bearer")
