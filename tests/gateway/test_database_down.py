"""Postgres down is a 503 with Retry-After on every route (gateway/errors.py, gateway/db.py).

A real Postgres is stopped under a running gateway. Every route of the app (read from its
routes, so a new one is covered) is called with an admin's access token, which needs the
database on every request, and the four routes whose credentials are in the body (login,
admin login, refresh, logout) with real credentials: none answers 500; each one that needs the
database answers 503 `database_unavailable` with Retry-After in the gateway's envelope. The
logins once answered 500 (a bare ConnectionRefusedError from asyncpg, which SQLAlchemy does
not wrap); every route now reaches the same one handler. With Postgres back, they work again.
"""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
from fastapi import FastAPI
from sqlalchemy import text

from gateway.deps import SessionDep
from tests.helpers.app import make_settings, running_app
from tests.helpers.auth import ADMIN_PASSWORD, auth_settings, bearer, login
from tests.helpers.postgres import PostgresServer
from tests.helpers.routes import concrete, flat_routes

# Answered without the database: liveness, the documents, the pages and their assets, the
# Prometheus scrape (its own token, none sent here: 401).
NO_DATABASE = {
    "/",
    "/health",
    "/openapi.json",
    "/docs",
    "/docs/oauth2-redirect",
    "/redoc",
    "/docs/assets/{file}",
    "/chat",
    "/chat-streaming",
    "/test",
    "/dashboard",
    "/admin",
    "/ui/static/{asset}",
    "/metrics",
    # Replicas' fleet routes: the fleet token, never a user (401 here), and no user lookup.
    "/internal/fleet/jobs",
    "/internal/fleet/jobs/{job_id}",
}
# Readiness reports the database itself (503 in its own shape, tests/gateway/health).
REPORTS_IT = {"/health/ready"}


def assert_database_unavailable(response: httpx.Response, label: str) -> None:
    """503, the gateway's envelope with code database_unavailable, a positive Retry-After."""
    assert response.status_code == 503, (label, response.status_code, response.text)
    body = response.json()
    if " /v1/messages" in label:  # Anthropic's envelope: no code, the same message
        assert body["type"] == "error", label
        assert body["error"]["type"] == "overloaded_error", label
        assert body["error"]["message"].startswith("The database is unavailable"), label
    else:
        assert body["error"]["code"] == "database_unavailable", (label, response.text)
    assert response.headers["X-Error-Source"] == "gateway", label
    assert int(response.headers["Retry-After"]) > 0, label


async def test_database_down_is_a_503_on_every_route(
    pg_url: str, postgres_server: PostgresServer
) -> None:
    settings = auth_settings(pg_url)
    async with running_app(settings) as (app, client):
        pair = await login(client, "admin", ADMIN_PASSWORD)
        second = await login(client, "admin", ADMIN_PASSWORD)
        token = bearer(pair["access_token"])
        credentials = {"username": "admin", "password": ADMIN_PASSWORD}
        in_body: list[tuple[str, dict[str, Any], dict[str, str]]] = [
            ("/api/auth/login", credentials, {}),
            ("/admin/api/login", credentials, {}),
            ("/api/auth/refresh", {"refresh_token": pair["refresh_token"]}, {}),
            ("/api/auth/logout", {"refresh_token": second["refresh_token"]}, {}),
        ]
        routes = [
            (method, leaf.path)
            for leaf in flat_routes(app.routes)
            for method in sorted(leaf.methods or ())
            if method != "HEAD"
        ]
        assert len(routes) > 30
        checked = {path for path, _, _ in in_body}
        await asyncio.to_thread(postgres_server.pause)
        try:
            for path, body, headers in in_body:
                assert_database_unavailable(
                    await client.post(path, json=body, headers=headers), path
                )
            for method, path in routes:
                if path == "/api/models/events" or path in checked:
                    # An SSE stream that ends only when the client leaves (the next test);
                    # the credentials-in-body routes were called with real ones above.
                    continue
                label = f"{method} {path}"
                body = {"json": {}} if method in ("POST", "PUT", "PATCH") else {}
                response = await client.request(method, concrete(path), headers=token, **body)
                assert response.status_code != 500, (label, response.text)
                if path in NO_DATABASE:
                    assert response.status_code < 500, (label, response.text)
                elif path in REPORTS_IT:
                    assert response.status_code == 503, (label, response.text)
                else:
                    assert_database_unavailable(response, label)
        finally:
            await asyncio.to_thread(postgres_server.resume)
        # Back by itself: the pool reconnects, nothing is stuck.
        again = await client.post("/api/auth/login", json=credentials)
        assert again.status_code == 200, again.text
        refreshed = await client.post(
            "/api/auth/refresh", json={"refresh_token": pair["refresh_token"]}
        )
        assert refreshed.status_code == 200, refreshed.text
        me = await client.get("/api/auth/me", headers=bearer(again.json()["access_token"]))
        assert me.status_code == 200, me.text


async def test_the_events_stream_is_refused_with_the_database_down(
    pg_url: str, postgres_server: PostgresServer
) -> None:
    """The one route the sweep above leaves out: its caller is checked before it streams."""
    settings = auth_settings(pg_url)
    async with running_app(settings) as (_, client):
        token = bearer((await login(client, "admin", ADMIN_PASSWORD))["access_token"])
        await asyncio.to_thread(postgres_server.pause)
        try:
            events = await client.get("/api/models/events", headers=token)
            assert_database_unavailable(events, "GET /api/models/events")
        finally:
            await asyncio.to_thread(postgres_server.resume)


async def test_an_error_that_is_not_an_outage_is_not_reported_as_one(pg_url: str) -> None:
    """Only a database that cannot be reached is a 503: another database error (here a
    division by zero, SQLSTATE 22012) is the 500 it is, not hidden behind Retry-After."""

    def add_route(app: FastAPI) -> None:
        @app.get("/_test/bad-sql")
        async def bad_sql(session: SessionDep) -> dict[str, str]:
            await session.execute(text("SELECT 1 / 0"))
            return {}

    async with running_app(make_settings(DATABASE_URL=pg_url), add_route) as (_, client):
        response = await client.get("/_test/bad-sql")
        assert response.status_code == 500, response.text
        assert "Retry-After" not in response.headers
        assert response.json()["error"]["code"] == "internal_error"
