"""The first admin: from ADMIN_PASSWORD, generated once in development, never a default."""

from __future__ import annotations

import re

import pytest
from sqlalchemy import select

from gateway.db import create_engine, create_session_factory
from gateway.users.models import User
from tests.helpers.app import running_app
from tests.helpers.auth import (
    ADMIN_PASSWORD,
    ResponseLog,
    assert_openai_error,
    auth_app,
    auth_settings,
    login,
)

_BANNER = re.compile(r"Development admin account: (\S+) / (\S+)")


async def _users(url: str) -> list[User]:
    engine = create_engine(url, pool_size=1)
    try:
        async with create_session_factory(engine)() as session:
            return list(await session.scalars(select(User)))
    finally:
        await engine.dispose()


async def test_first_admin_from_settings(pg_url: str, response_log: ResponseLog) -> None:
    settings = auth_settings(pg_url, ADMIN_USERNAME="root-ops")
    async with auth_app(settings, response_log) as (_, client):
        tokens = await login(client, "root-ops", ADMIN_PASSWORD)
        await login(client, "root-ops", ADMIN_PASSWORD, path="/admin/api/login")
        default_name = await client.post(
            "/api/auth/login", json={"username": "admin", "password": ADMIN_PASSWORD}
        )
    assert tokens["access_token"]
    assert_openai_error(default_name, 401, "invalid_credentials")
    # A second start with another ADMIN_PASSWORD changes nothing: an admin exists.
    async with auth_app(
        auth_settings(pg_url, ADMIN_USERNAME="root-ops", ADMIN_PASSWORD="other-pw-123"),
        response_log,
    ) as (_, client):
        await login(client, "root-ops", ADMIN_PASSWORD)
    users = await _users(pg_url)
    assert [(u.username, u.role) for u in users] == [("root-ops", "admin")]


async def test_development_prints_a_generated_password_once(
    pg_url: str, response_log: ResponseLog, capsys: pytest.CaptureFixture[str]
) -> None:
    settings = auth_settings(pg_url, ENVIRONMENT="development", ADMIN_PASSWORD=None)
    async with auth_app(settings, response_log) as (_, client):
        err = capsys.readouterr().err
        banners = _BANNER.findall(err)
        assert len(banners) == 1, err
        username, password = banners[0]
        assert username == "admin"
        assert len(password) >= 16
        # Printed once, on its own: not in any structured log line.
        assert err.count(password) == 1
        await login(client, username, password)
    assert password not in capsys.readouterr().err
    async with auth_app(settings, response_log) as (_, client):
        await login(client, username, password)
    second = capsys.readouterr().err
    assert not _BANNER.search(second)
    assert password not in second
    assert [(u.username, u.role) for u in await _users(pg_url)] == [("admin", "admin")]


async def test_production_without_a_password_creates_no_admin(
    pg_url: str, response_log: ResponseLog, capsys: pytest.CaptureFixture[str]
) -> None:
    settings = auth_settings(pg_url, ADMIN_PASSWORD=None)
    async with auth_app(settings, response_log) as (_, client):
        guesses = [
            await client.post("/api/auth/login", json={"username": "admin", "password": guess})
            for guess in ("admin", "password", "changeme", "admin123")
        ]
    err = capsys.readouterr().err
    assert "no_admin_account" in err
    assert "create-admin" in err
    assert not _BANNER.search(err)
    assert await _users(pg_url) == []
    for response in guesses:
        assert_openai_error(response, 401, "invalid_credentials")


async def test_short_admin_password_is_refused(
    pg_url: str, response_log: ResponseLog, capsys: pytest.CaptureFixture[str]
) -> None:
    async with auth_app(auth_settings(pg_url, ADMIN_PASSWORD="short"), response_log):
        pass
    assert "admin_password_too_short" in capsys.readouterr().err
    assert await _users(pg_url) == []


async def test_an_unmigrated_database_does_not_stop_startup(
    postgres_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    async with running_app(auth_settings(postgres_url)) as (_, client):
        live = await client.get("/health")
    assert live.status_code == 200
    err = capsys.readouterr().err
    assert "admin_bootstrap_skipped" in err
    assert ADMIN_PASSWORD not in err
