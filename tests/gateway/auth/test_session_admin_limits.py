"""Refresh and logout share a per-IP limit; the admin API (and the model API) a per-caller one.

Both run through the strict limiter (here the in-process one; Redis down: quota/test_redis_down).
"""

from __future__ import annotations

import httpx

from tests.helpers.auth import (
    ADMIN_PASSWORD,
    USER_PASSWORD,
    assert_openai_error,
    auth_app,
    auth_settings,
    bearer,
    create_user,
    login,
)

ADMIN_KEY = "sk-admin-limits-test-8f3a2c9d1e"


def _assert_limited(response: httpx.Response, limit: int) -> None:
    assert_openai_error(response, 429, "rate_limit_exceeded")
    assert response.json()["error"]["type"] == "rate_limit_error"
    assert int(response.headers["retry-after"]) >= 1
    assert response.headers["x-ratelimit-limit-minute"] == str(limit)
    assert response.headers["x-ratelimit-remaining-minute"] == "0"


async def test_refresh_and_logout_share_one_limit_per_ip(sqlite_url: str) -> None:
    settings = auth_settings(
        sqlite_url, SESSION_RATE_LIMIT_PER_MINUTE=3, TRUSTED_PROXIES=["127.0.0.1"]
    )
    async with auth_app(settings) as (_, client):
        pair = await login(client, "admin", ADMIN_PASSWORD)
        codes = []
        for _ in range(2):
            reply = await client.post(
                "/api/auth/refresh", json={"refresh_token": pair["refresh_token"]}
            )
            codes.append(reply.status_code)
            pair = reply.json()
        logout = await client.post(
            "/api/auth/logout", json={"refresh_token": pair["refresh_token"]}
        )
        codes.append(logout.status_code)
        assert codes == [200, 200, 204]

        other = await login(client, "admin", ADMIN_PASSWORD)  # login has its own budget
        refused = await client.post(
            "/api/auth/refresh", json={"refresh_token": other["refresh_token"]}
        )
        _assert_limited(refused, 3)
        _assert_limited(await client.post("/api/auth/logout", headers=bearer("x.y.z")), 3)

        # Per IP: a client behind the trusted proxy has a budget of its own.
        elsewhere = await client.post(
            "/api/auth/refresh",
            json={"refresh_token": other["refresh_token"]},
            headers={"X-Forwarded-For": "192.0.2.9"},
        )
        assert elsewhere.status_code == 200, elsewhere.text


def _admin_rejections() -> float:
    from prometheus_client import REGISTRY

    value = REGISTRY.get_sample_value(
        "gateway_rate_limit_rejections_total", {"tier": "none", "limit": "admin"}
    )
    return value or 0.0


async def test_admin_routes_are_limited_per_caller(sqlite_url: str) -> None:
    settings = auth_settings(sqlite_url, ADMIN_RATE_LIMIT_PER_MINUTE=3, ADMIN_API_KEY=ADMIN_KEY)
    rejected_before = _admin_rejections()
    async with auth_app(settings) as (_, client):
        admin = bearer(str((await login(client, "admin", ADMIN_PASSWORD))["access_token"]))
        codes = [
            (await client.get("/admin/api/users", headers=admin)).status_code,
            (await client.get("/admin/api/keys", headers=admin)).status_code,
            (await client.get("/admin/api/usage", headers=admin)).status_code,
        ]
        assert codes == [200, 200, 200]
        _assert_limited(await client.get("/admin/api/users", headers=admin), 3)
        # The model management API is the same admin budget.
        _assert_limited(await client.get("/api/models/status", headers=admin), 3)
        _assert_limited(
            await client.post("/api/models/switch", json={"profile_id": "x"}, headers=admin), 3
        )
        # The rejections are counted under their own label (not "other").
        assert _admin_rejections() - rejected_before == 3

        # Another caller (the admin key) has a budget of its own.
        await create_user(client, ADMIN_KEY, "limited-user")
        listed = await client.get("/admin/api/users", headers=bearer(ADMIN_KEY))
        assert listed.status_code == 200, listed.text
        # A caller who is not an admin is refused as before, not counted.
        user = bearer(str((await login(client, "limited-user", USER_PASSWORD))["access_token"]))
        assert_openai_error(await client.get("/admin/api/users", headers=user), 403)
