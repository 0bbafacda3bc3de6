"""Admin user management, function-level authz, and the admin gate of the model API."""

from __future__ import annotations

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

ADMIN_KEY = "sk-admin-auth-tests-5c1e9b7d3a"
USER_FIELDS = {
    "id", "username", "email", "role", "tier", "is_active", "has_password", "created_at",
    "last_login_at",
}  # fmt: skip


async def test_create_list_update_deactivate(pg_url: str, response_log: ResponseLog) -> None:
    async with auth_app(auth_settings(pg_url), response_log) as (_, client):
        admin = await login(client, "admin", ADMIN_PASSWORD)
        auth = bearer(admin["access_token"])
        carol = await create_user(
            client, admin["access_token"], "carol", email="carol@example.org", tier="premium"
        )
        service = await create_user(client, admin["access_token"], "ci-bot", password=None)
        duplicate = await client.post(
            "/admin/api/users", json={"username": "carol", "password": USER_PASSWORD}, headers=auth
        )
        listing = await client.get("/admin/api/users", headers=auth)
        page = await client.get("/admin/api/users?limit=1&offset=1", headers=auth)
        one = await client.get(f"/admin/api/users/{carol['id']}", headers=auth)
        carol_tokens = await login(client, "carol", USER_PASSWORD)
        carol_auth = bearer(carol_tokens["access_token"])
        before = await client.get("/api/auth/me", headers=carol_auth)

        to_free = await client.patch(
            f"/admin/api/users/{carol['id']}", json={"tier": "free"}, headers=auth
        )
        tier_seen = (await client.get("/api/auth/me", headers=carol_auth)).json()["tier"]
        deactivated = await client.patch(
            f"/admin/api/users/{carol['id']}", json={"is_active": False}, headers=auth
        )
        access_after = await client.get("/api/auth/me", headers=carol_auth)
        refresh_after = await client.post(
            "/api/auth/refresh", json={"refresh_token": carol_tokens["refresh_token"]}
        )
        login_after = await client.post(
            "/api/auth/login", json={"username": "carol", "password": USER_PASSWORD}
        )
        await client.patch(
            f"/admin/api/users/{carol['id']}", json={"is_active": True}, headers=auth
        )
        await login(client, "carol", USER_PASSWORD)
        missing = await client.patch(
            "/admin/api/users/00000000-0000-4000-8000-000000000000",
            json={"tier": "free"},
            headers=auth,
        )
        # An empty patch (or one of nulls) changes nothing and answers the user as it is.
        empty = await client.patch(f"/admin/api/users/{carol['id']}", json={}, headers=auth)
        nulls = await client.patch(
            f"/admin/api/users/{carol['id']}",
            json={"is_active": None, "role": None, "tier": None},
            headers=auth,
        )
        sneaky = [
            await client.patch(f"/admin/api/users/{carol['id']}", json=body, headers=auth)
            for body in (
                {"password_hash": "$argon2id$x"},
                {"username": "root"},
                {"role": "superuser"},
                {"tier": "unlimited"},
            )
        ]
        bad_create = [
            await client.post("/admin/api/users", json=body, headers=auth)
            for body in (
                {"username": "x", "password": USER_PASSWORD, "is_admin": True},
                {"username": "x", "password": USER_PASSWORD, "password_hash": "h"},
                {"username": "bad name", "password": USER_PASSWORD},
                {"username": "x", "password": "short"},
                {"username": "x", "password": USER_PASSWORD, "email": "not-an-email"},
            )
        ]
    assert carol["role"] == "user"
    assert carol["tier"] == "premium"
    assert carol["has_password"] is True
    assert set(carol) == USER_FIELDS
    assert service["has_password"] is False
    assert_openai_error(duplicate, 409, "username_taken")
    assert listing.status_code == 200
    assert listing.json()["total"] == 3
    assert [u["username"] for u in listing.json()["data"]] == ["admin", "carol", "ci-bot"]
    assert all(set(u) == USER_FIELDS for u in listing.json()["data"])
    assert [u["username"] for u in page.json()["data"]] == ["carol"]
    assert one.json()["email"] == "carol@example.org"
    assert before.json()["tier"] == "premium"
    assert to_free.json()["tier"] == "free"
    assert tier_seen == "free"
    assert deactivated.json()["is_active"] is False
    assert_openai_error(access_after, 401, "invalid_token")
    assert_openai_error(refresh_after, 401, "invalid_token")
    assert_openai_error(login_after, 401, "invalid_credentials")
    assert_openai_error(missing, 404, "user_not_found")
    for unchanged in (empty, nulls):
        assert unchanged.status_code == 200, unchanged.text
        assert {k: unchanged.json()[k] for k in ("role", "tier", "is_active")} == {
            "role": "user",
            "tier": "free",
            "is_active": True,
        }
    for response in [*sneaky, *bad_create]:
        assert_openai_error(response, 400)


async def test_roles_take_effect_at_once_and_the_last_admin_stays(
    pg_url: str, response_log: ResponseLog
) -> None:
    async with auth_app(auth_settings(pg_url), response_log) as (_, client):
        admin = await login(client, "admin", ADMIN_PASSWORD)
        auth = bearer(admin["access_token"])
        admin_id = (await client.get("/api/auth/me", headers=auth)).json()["id"]
        self_demote = await client.patch(
            f"/admin/api/users/{admin_id}", json={"role": "user"}, headers=auth
        )
        self_deactivate = await client.patch(
            f"/admin/api/users/{admin_id}", json={"is_active": False}, headers=auth
        )
        dave = await create_user(client, admin["access_token"], "dave")
        dave_auth = bearer((await login(client, "dave", USER_PASSWORD))["access_token"])
        as_user = await client.get("/admin/api/users", headers=dave_auth)
        await client.patch(f"/admin/api/users/{dave['id']}", json={"role": "admin"}, headers=auth)
        # The same access token: the role is read from the database on every request.
        as_admin = await client.get("/admin/api/users", headers=dave_auth)
        demote_first = await client.patch(
            f"/admin/api/users/{admin_id}", json={"role": "user"}, headers=dave_auth
        )
        first_now = await client.get("/admin/api/users", headers=auth)
    assert_openai_error(self_demote, 409, "last_admin")
    assert_openai_error(self_deactivate, 409, "last_admin")
    assert_openai_error(as_user, 403, "admin_required")
    assert as_admin.status_code == 200
    assert demote_first.json()["role"] == "user"
    assert_openai_error(first_now, 403, "admin_required")


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/admin/api/users"),
        ("POST", "/admin/api/users"),
        ("GET", "/admin/api/users/00000000-0000-4000-8000-000000000000"),
        ("PATCH", "/admin/api/users/00000000-0000-4000-8000-000000000000"),
        ("GET", "/api/models/status"),
        ("GET", "/api/gpus"),
        ("POST", "/api/models/reload"),
    ],
)
async def test_admin_routes_need_an_admin(
    module_pg_url: str, method: str, path: str, response_log: ResponseLog
) -> None:
    settings = auth_settings(module_pg_url, ADMIN_API_KEY=ADMIN_KEY, REQUIRE_AUTH=False)
    async with auth_app(settings, response_log) as (_, client):
        admin = await login(client, "admin", ADMIN_PASSWORD)
        users = (
            await client.get("/admin/api/users", headers=bearer(admin["access_token"]))
        ).json()["data"]
        if "erin" not in {u["username"] for u in users}:
            await create_user(client, admin["access_token"], "erin")
        erin = await login(client, "erin", USER_PASSWORD)
        body = {"username": f"u{len(users)}", "password": USER_PASSWORD, "tier": "free"}
        anonymous = await client.request(method, path, json=body)
        user = await client.request(method, path, json=body, headers=bearer(erin["access_token"]))
        wrong_key = await client.request(method, path, json=body, headers=bearer(ADMIN_KEY[:-1]))
        by_jwt = await client.request(
            method, path, json=body, headers=bearer(admin["access_token"])
        )
        by_key = await client.request(method, path, json=body, headers=bearer(ADMIN_KEY))
    # REQUIRE_AUTH=false never opens admin routes to anonymous callers.
    assert_openai_error(anonymous, 401, "missing_credentials")
    assert_openai_error(user, 403, "admin_required")
    assert_openai_error(wrong_key, 401)
    for response in (by_jwt, by_key):
        assert response.status_code not in (401, 403), response.text


async def test_anonymous_principal_only_when_auth_is_off(
    module_pg_url: str, response_log: ResponseLog
) -> None:
    async with auth_app(auth_settings(module_pg_url, REQUIRE_AUTH=False), response_log) as (
        _,
        client,
    ):
        anonymous = await client.get("/api/auth/me")
        bad = await client.get("/api/auth/me", headers=bearer("not.a.jwt"))
        bad_key = await client.get("/api/auth/me", headers=bearer("sk-vcg-not-a-real-key"))
        # The seed's clients send a placeholder key ("not-needed") when none is required.
        placeholder = await client.get("/api/auth/me", headers=bearer("not-needed"))
        basic = await client.get("/api/auth/me", headers={"Authorization": "Basic YTpi"})
        edit = await client.patch("/api/auth/me", json={"email": "a@b.cd"})
    assert anonymous.status_code == 200
    assert anonymous.json() == {
        "id": None,
        "username": "anonymous",
        "role": "user",
        "tier": "standard",
        "email": None,
        "is_active": True,
        "via": "anonymous",
    }
    # Credentials that look like ours must be valid, even when none are required.
    assert_openai_error(bad, 401, "invalid_token")
    assert bad_key.status_code == 401
    assert placeholder.status_code == 200
    assert placeholder.json()["via"] == "anonymous"
    assert_openai_error(basic, 401, "invalid_credentials")
    assert_openai_error(edit, 403, "no_account")


async def test_api_key_principal_follows_its_owner(pg_url: str, response_log: ResponseLog) -> None:
    async with auth_app(auth_settings(pg_url), response_log) as (_, client):
        admin = await login(client, "admin", ADMIN_PASSWORD)
        auth = bearer(admin["access_token"])
        grace = await create_user(client, admin["access_token"], "grace", tier="premium")
        created = await client.post(
            "/admin/api/keys",
            json={"user_id": "grace", "tier": "free", "allowed_models": ["sim-a"]},
            headers=auth,
        )
        assert created.status_code == 201, created.text
        key = bearer(created.json()["key"])
        me = await client.get("/api/auth/me", headers=key)
        not_admin = await client.get("/admin/api/users", headers=key)
        await client.patch(
            f"/admin/api/users/{grace['id']}", json={"is_active": False}, headers=auth
        )
        # At once, not after the key cache's lifetime.
        after_deactivation = await client.get("/api/auth/me", headers=key)
        unknown_key = await client.get("/api/auth/me", headers=bearer("sk-vcg-" + "0" * 40))
    assert me.status_code == 200, me.text
    assert me.json()["via"] == "api_key"
    assert me.json()["username"] == "grace"
    assert me.json()["tier"] == "free"  # the key's tier, not the owner's
    assert_openai_error(not_admin, 403, "admin_required")
    assert_openai_error(after_deactivation, 401, "invalid_api_key")
    assert_openai_error(unknown_key, 401, "invalid_api_key")
