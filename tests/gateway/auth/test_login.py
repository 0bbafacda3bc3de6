"""Login (JSON and OAuth2 form), /me, self-service without escalation, secrets kept out of logs."""

from __future__ import annotations

import time

import pytest

from tests.helpers.auth import (
    ADMIN_PASSWORD,
    USER_PASSWORD,
    ResponseLog,
    assert_openai_error,
    auth_app,
    auth_settings,
    bearer,
    create_user,
    login,
)

ME_FIELDS = {"id", "username", "role", "tier", "email", "is_active", "via"}


async def test_login_json_and_form_and_me(
    pg_url: str, response_log: ResponseLog, capsys: pytest.CaptureFixture[str]
) -> None:
    async with auth_app(auth_settings(pg_url), response_log) as (_, client):
        by_json = await client.post(
            "/api/auth/login", json={"username": "admin", "password": ADMIN_PASSWORD}
        )
        by_form = await client.post(
            "/api/auth/login",
            data={"username": "admin", "password": ADMIN_PASSWORD, "grant_type": "password"},
        )
        for response in (by_json, by_form):
            assert response.status_code == 200, response.text
            body = response.json()
            assert set(body) == {"access_token", "refresh_token", "token_type", "expires_in"}
            assert body["token_type"] == "bearer"
            assert body["expires_in"] == 3600
            assert response.headers["cache-control"] == "no-store"
        me = await client.get("/api/auth/me", headers=bearer(by_form.json()["access_token"]))
        admin_console = await client.post(
            "/admin/api/login", json={"username": "admin", "password": ADMIN_PASSWORD}
        )
        anonymous = await client.get("/api/auth/me")
    assert me.status_code == 200
    assert set(me.json()) == ME_FIELDS
    assert me.json() | {"id": None} == {
        "id": None,
        "username": "admin",
        "role": "admin",
        "tier": "premium",
        "email": None,
        "is_active": True,
        "via": "jwt",
    }
    assert admin_console.status_code == 200
    assert_openai_error(anonymous, 401, "missing_credentials")
    # Nothing secret reached the logs: passwords, tokens.
    logs = capsys.readouterr().err
    assert ADMIN_PASSWORD not in logs
    for response in (by_json, by_form, admin_console):
        assert response.json()["access_token"] not in logs
        assert response.json()["refresh_token"] not in logs


async def test_unknown_user_and_wrong_password_look_the_same(
    pg_url: str, response_log: ResponseLog
) -> None:
    async with auth_app(auth_settings(pg_url), response_log) as (_, client):
        admin = await login(client, "admin", ADMIN_PASSWORD)
        await create_user(client, admin["access_token"], "svc", password=None)  # service account
        await create_user(client, admin["access_token"], "gone")
        gone = (await client.get("/admin/api/users", headers=bearer(admin["access_token"]))).json()
        gone_id = next(u["id"] for u in gone["data"] if u["username"] == "gone")
        await client.patch(
            f"/admin/api/users/{gone_id}",
            json={"is_active": False},
            headers=bearer(admin["access_token"]),
        )

        async def attempt(username: str, password: str) -> tuple[float, int, bytes]:
            started = time.perf_counter()
            response = await client.post(
                "/api/auth/login", json={"username": username, "password": password}
            )
            return time.perf_counter() - started, response.status_code, response.content

        await attempt("nobody", "x")  # the dummy hash is made once, on first use
        wrong = [await attempt("admin", "wrong-password") for _ in range(3)]
        unknown = [await attempt("nobody-here", "wrong-password") for _ in range(3)]
        service_account = await attempt("svc", "")
        inactive = await attempt("gone", USER_PASSWORD)
        form_unknown = await client.post(
            "/api/auth/login", data={"username": "nobody-here", "password": "wrong-password"}
        )
    bodies = {body for _, _, body in [*wrong, *unknown, inactive]} | {form_unknown.content}
    assert len(bodies) == 1, bodies
    assert {status for _, status, _ in [*wrong, *unknown, inactive]} == {401}
    assert_openai_error(form_unknown, 401, "invalid_credentials")
    assert service_account[1] in (400, 401)  # empty password: refused before or at verification
    # An unknown user costs an argon2 verification too (no fast "no such user" path).
    median_wrong = sorted(t for t, _, _ in wrong)[1]
    median_unknown = sorted(t for t, _, _ in unknown)[1]
    assert median_unknown > 0.5 * median_wrong, (median_unknown, median_wrong)


async def test_login_bodies_are_strict(pg_url: str, response_log: ResponseLog) -> None:
    async with auth_app(auth_settings(pg_url), response_log) as (_, client):
        extra_json = await client.post(
            "/api/auth/login",
            json={"username": "admin", "password": ADMIN_PASSWORD, "role": "admin"},
        )
        extra_form = await client.post(
            "/api/auth/login",
            data={"username": "admin", "password": ADMIN_PASSWORD, "role": "admin"},
        )
        other_grant = await client.post(
            "/api/auth/login",
            data={"username": "admin", "password": ADMIN_PASSWORD, "grant_type": "client_creds"},
        )
        missing = await client.post("/api/auth/login", json={"username": "admin"})
        not_json = await client.post(
            "/api/auth/login", content=b"{", headers={"content-type": "application/json"}
        )
        xml = await client.post(
            "/api/auth/login", content=b"<x/>", headers={"content-type": "application/xml"}
        )
        huge = await client.post(
            "/api/auth/login",
            json={"username": "admin", "password": "x" * 20000},
        )
    for response in (extra_json, extra_form, other_grant, missing, not_json):
        assert_openai_error(response, 400)
        assert ADMIN_PASSWORD not in response.text
    assert extra_json.json()["error"]["param"] == "role"
    assert_openai_error(xml, 415)
    assert_openai_error(huge, 413)


async def test_self_service_cannot_escalate(pg_url: str, response_log: ResponseLog) -> None:
    async with auth_app(auth_settings(pg_url), response_log) as (_, client):
        admin = await login(client, "admin", ADMIN_PASSWORD)
        await create_user(client, admin["access_token"], "bob", tier="free")
        bob = await login(client, "bob", USER_PASSWORD)
        auth = bearer(bob["access_token"])
        attempts = [
            {"role": "admin"},
            {"tier": "premium"},
            {"is_active": True, "email": "bob@example.org"},
            {"username": "admin"},
            {"password_hash": "x"},
            {"email": "bob@example.org", "role": "admin"},
        ]
        refused = [await client.patch("/api/auth/me", json=body, headers=auth) for body in attempts]
        refresh_escalation = await client.post(
            "/api/auth/refresh", json={"refresh_token": bob["refresh_token"], "role": "admin"}
        )
        me = await client.get("/api/auth/me", headers=auth)
        admin_routes = [
            await client.get("/admin/api/users", headers=auth),
            await client.post(
                "/admin/api/users",
                json={"username": "mallory", "password": USER_PASSWORD, "role": "admin"},
                headers=auth,
            ),
            await client.patch(
                f"/admin/api/users/{me.json()['id']}", json={"role": "admin"}, headers=auth
            ),
        ]
        email = await client.patch("/api/auth/me", json={"email": "bob@example.org"}, headers=auth)
        admin_login = await client.post(
            "/admin/api/login", json={"username": "bob", "password": USER_PASSWORD}
        )
        after = await client.get("/api/auth/me", headers=auth)
    for response in [*refused, refresh_escalation]:
        assert_openai_error(response, 400)
    for response in admin_routes:
        assert_openai_error(response, 403, "admin_required")
    assert_openai_error(admin_login, 403, "admin_required")
    assert email.status_code == 200, email.text
    assert after.json()["role"] == "user"
    assert after.json()["tier"] == "free"
    assert after.json()["email"] == "bob@example.org"


async def test_password_change_needs_the_old_one_and_ends_sessions(
    pg_url: str, response_log: ResponseLog
) -> None:
    new_password = "a-brand-new-passphrase"
    async with auth_app(auth_settings(pg_url), response_log) as (_, client):
        admin = await login(client, "admin", ADMIN_PASSWORD)
        await create_user(client, admin["access_token"], "bob")
        bob = await login(client, "bob", USER_PASSWORD)
        auth = bearer(bob["access_token"])
        no_old = await client.patch(
            "/api/auth/me", json={"new_password": new_password}, headers=auth
        )
        wrong_old = await client.patch(
            "/api/auth/me",
            json={"current_password": "nope-nope", "new_password": new_password},
            headers=auth,
        )
        too_short = await client.patch(
            "/api/auth/me",
            json={"current_password": USER_PASSWORD, "new_password": "short"},
            headers=auth,
        )
        changed = await client.patch(
            "/api/auth/me",
            json={"current_password": USER_PASSWORD, "new_password": new_password},
            headers=auth,
        )
        old_session = await client.get("/api/auth/me", headers=auth)
        old_refresh = await client.post(
            "/api/auth/refresh", json={"refresh_token": bob["refresh_token"]}
        )
        old_password = await client.post(
            "/api/auth/login", json={"username": "bob", "password": USER_PASSWORD}
        )
        await login(client, "bob", new_password)
    assert_openai_error(no_old, 403, "wrong_password")
    assert_openai_error(wrong_old, 403, "wrong_password")
    assert_openai_error(too_short, 400)
    assert changed.status_code == 200, changed.text
    assert_openai_error(old_session, 401, "invalid_token")
    assert_openai_error(old_refresh, 401, "invalid_token")
    assert_openai_error(old_password, 401, "invalid_credentials")


def test_openapi_documents_both_login_bodies_and_no_hashes() -> None:
    from gateway.app import create_app
    from tests.helpers.app import make_settings

    spec = create_app(make_settings(DATABASE_URL="sqlite+aiosqlite:///:memory:")).openapi()
    login_body = spec["paths"]["/api/auth/login"]["post"]["requestBody"]["content"]
    assert set(login_body) == {"application/json", "application/x-www-form-urlencoded"}
    text = str(spec)
    assert "password_hash" not in text
    assert "argon2" not in text
