"""The NUL character on PostgreSQL: refused with a 400 naming the field on the identity routes,
and a 400 (never a 500) from any path that still hands one to the database."""

from __future__ import annotations

from fastapi import FastAPI
from sqlalchemy import text

from gateway.db import create_engine, create_session_factory
from tests.helpers.app import running_app
from tests.helpers.auth import ADMIN_PASSWORD, auth_settings, bearer, login


async def test_identity_routes_refuse_nul_naming_the_field(pg_url: str) -> None:
    async with running_app(auth_settings(pg_url)) as (_, client):
        admin = bearer(str((await login(client, "admin", ADMIN_PASSWORD))["access_token"]))
        cases = [
            ("/admin/api/keys", {"user_id": "a\u0000b", "tier": "free"}, "user_id"),
            ("/admin/api/keys", {"user_id": "admin", "description": "x\u0000"}, "description"),
            (
                "/api/keys",
                {"description": "laptop", "allowed_models": ["m\u0000"]},
                "allowed_models.0",
            ),
            ("/api/auth/login", {"username": "ad\u0000min", "password": "x"}, "username"),
            ("/api/auth/refresh", {"refresh_token": "a\u0000b"}, "refresh_token"),
        ]
        for path, body, param in cases:
            response = await client.post(path, json=body, headers=admin)
            assert response.status_code == 400, (path, response.text)
            error = response.json()["error"]
            assert error["param"] == param, (path, error)
            # A user_id's pattern (letters, digits and . _ @ -) refuses the NUL first.
            assert "NUL" in error["message"] or param == "user_id", error
        # Nothing was created by the refused requests.
        keys = await client.get("/admin/api/keys", headers=admin)
        assert keys.status_code == 200
        assert keys.json()["data"] == [], keys.text


async def test_a_nul_that_reaches_postgres_is_a_400_not_a_500(pg_url: str) -> None:
    engine = create_engine(pg_url, pool_size=1)
    sessions = create_session_factory(engine)

    def route(app: FastAPI) -> None:
        @app.get("/_test/nul")
        async def nul() -> dict[str, str]:
            async with sessions() as session:
                await session.execute(text("SELECT CAST(:v AS text)"), {"v": "a\x00b"})
            return {"reached": "no"}

    try:
        async with running_app(auth_settings(pg_url, REQUIRE_AUTH=False), route) as (_, client):
            response = await client.get("/_test/nul")
        assert response.status_code == 400, response.text
        assert response.json()["error"]["code"] == "invalid_text"
    finally:
        await engine.dispose()


async def test_a_key_expiry_is_a_date_time_not_a_number(pg_url: str) -> None:
    async with running_app(auth_settings(pg_url)) as (_, client):
        admin = bearer(str((await login(client, "admin", ADMIN_PASSWORD))["access_token"]))
        number = await client.post(
            "/api/keys", json={"description": "n", "expires_at": 1893456000}, headers=admin
        )
        assert number.status_code == 400, number.text
        assert number.json()["error"]["param"] == "expires_at"
        text = await client.post(
            "/api/keys",
            json={"description": "t", "expires_at": "2099-01-31T00:00:00Z"},
            headers=admin,
        )
        assert text.status_code == 201, text.text
        assert text.json()["expires_at"].startswith("2099-01-31T00:00:00")
