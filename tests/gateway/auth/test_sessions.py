"""Refresh-token rotation, reuse detection (the whole family is revoked), logout."""

from __future__ import annotations

import asyncio
import uuid

import jwt
from sqlalchemy import select

from gateway.auth.models import RefreshToken
from gateway.db import create_engine, create_session_factory
from tests.helpers.auth import (
    ADMIN_PASSWORD,
    ResponseLog,
    assert_openai_error,
    auth_app,
    auth_settings,
    bearer,
    login,
)


def _jti(token: str) -> uuid.UUID:
    return uuid.UUID(jwt.decode(token, options={"verify_signature": False})["jti"])


async def _family_rows(url: str, refresh_token: str) -> list[RefreshToken]:
    engine = create_engine(url, pool_size=1)
    try:
        async with create_session_factory(engine)() as session:
            row = await session.get(RefreshToken, _jti(refresh_token))
            assert row is not None
            rows = await session.scalars(
                select(RefreshToken).where(RefreshToken.family_id == row.family_id)
            )
            return list(rows)
    finally:
        await engine.dispose()


async def test_rotation_and_reuse_detection(pg_url: str, response_log: ResponseLog) -> None:
    async with auth_app(auth_settings(pg_url), response_log) as (_, client):
        first = await login(client, "admin", ADMIN_PASSWORD)
        other_session = await login(client, "admin", ADMIN_PASSWORD)

        async def refresh(token: str) -> dict[str, object]:
            response = await client.post("/api/auth/refresh", json={"refresh_token": token})
            assert response.status_code == 200, response.text
            assert response.headers["cache-control"] == "no-store"
            return dict(response.json())

        second = await refresh(str(first["refresh_token"]))
        third = await refresh(str(second["refresh_token"]))
        assert len({first["refresh_token"], second["refresh_token"], third["refresh_token"]}) == 3
        newest_works = await client.get("/api/auth/me", headers=bearer(str(third["access_token"])))

        # The first refresh token comes back (stolen copy): refused, and the family dies.
        reuse = await client.post(
            "/api/auth/refresh", json={"refresh_token": first["refresh_token"]}
        )
        newest_refresh = await client.post(
            "/api/auth/refresh", json={"refresh_token": third["refresh_token"]}
        )
        newest_access = await client.get("/api/auth/me", headers=bearer(str(third["access_token"])))
        untouched = await refresh(str(other_session["refresh_token"]))
    assert newest_works.status_code == 200
    assert_openai_error(reuse, 401, "invalid_token")
    assert_openai_error(newest_refresh, 401, "invalid_token")
    assert_openai_error(newest_access, 401, "invalid_token")
    assert untouched["access_token"]
    rows = await _family_rows(pg_url, str(first["refresh_token"]))
    assert len(rows) == 3
    assert all(row.revoked_at is not None for row in rows)
    assert sum(row.used_at is not None for row in rows) == 2
    other_rows = await _family_rows(pg_url, str(other_session["refresh_token"]))
    assert all(row.revoked_at is None for row in other_rows)


async def test_concurrent_use_of_one_refresh_token_is_a_reuse(
    pg_url: str, response_log: ResponseLog
) -> None:
    async with auth_app(auth_settings(pg_url), response_log) as (_, client):
        pair = await login(client, "admin", ADMIN_PASSWORD)
        responses = await asyncio.gather(
            *(
                client.post("/api/auth/refresh", json={"refresh_token": pair["refresh_token"]})
                for _ in range(5)
            )
        )
    assert sorted(r.status_code for r in responses) == [200, 401, 401, 401, 401]
    rows = await _family_rows(pg_url, str(pair["refresh_token"]))
    assert all(row.revoked_at is not None for row in rows)


async def test_logout_revokes_the_session(pg_url: str, response_log: ResponseLog) -> None:
    async with auth_app(auth_settings(pg_url), response_log) as (_, client):
        by_refresh = await login(client, "admin", ADMIN_PASSWORD)
        by_access = await login(client, "admin", ADMIN_PASSWORD)
        kept = await login(client, "admin", ADMIN_PASSWORD)

        out_refresh = await client.post(
            "/api/auth/logout", json={"refresh_token": by_refresh["refresh_token"]}
        )
        out_access = await client.post(
            "/api/auth/logout", headers=bearer(by_access["access_token"])
        )
        again = await client.post(
            "/api/auth/logout", json={"refresh_token": by_refresh["refresh_token"]}
        )
        nothing = await client.post("/api/auth/logout")
        forged = await client.post("/api/auth/logout", json={"refresh_token": "a.b.c"})
        access_as_refresh = await client.post(
            "/api/auth/logout", json={"refresh_token": kept["access_token"]}
        )
        after = {
            name: (
                await client.post(
                    "/api/auth/refresh", json={"refresh_token": pair["refresh_token"]}
                ),
                await client.get("/api/auth/me", headers=bearer(pair["access_token"])),
            )
            for name, pair in (("refresh", by_refresh), ("access", by_access), ("kept", kept))
        }
    assert out_refresh.status_code == 204
    assert out_access.status_code == 204
    assert again.status_code == 204
    assert_openai_error(nothing, 400, "no_session")
    assert_openai_error(forged, 401, "invalid_token")
    assert_openai_error(access_as_refresh, 401, "invalid_token")
    for name in ("refresh", "access"):
        refreshed, me = after[name]
        assert_openai_error(refreshed, 401, "invalid_token")
        assert_openai_error(me, 401, "invalid_token")
    assert after["kept"][0].status_code == 200
    assert after["kept"][1].status_code == 200
