"""Access tokens at API-key speed: a session seen recently is resolved without the database
(gateway/auth/session_cache.py), and every change that must end or change it still applies at
once through this process, and within the cache's lifetime through another (the database)."""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import jwt
import pytest
from sqlalchemy import event, text

from gateway.auth.session_cache import SESSION_CACHE, SessionCache
from gateway.principal import Principal
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


class Statements:
    """The SQL the app's database engine runs while recording."""

    def __init__(self) -> None:
        self.seen: list[str] = []

    def __call__(self, _c: Any, _cur: Any, statement: str, *_: Any) -> None:
        self.seen.append(statement)

    def about_sessions(self) -> list[str]:
        return [s for s in self.seen if "refresh_tokens" in s or "FROM users" in s]


async def test_a_session_seen_recently_needs_no_database(pg_url: str) -> None:
    async with auth_app(auth_settings(pg_url)) as (app, client):
        token = (await login(client, "admin", ADMIN_PASSWORD))["access_token"]
        first = await client.get("/api/models/status", headers=bearer(token))
        assert first.status_code == 200, first.text
        engine = app.state.resources.db_engine.sync_engine
        statements = Statements()
        event.listen(engine, "before_cursor_execute", statements)
        try:
            for _ in range(5):
                again = await client.get("/api/models/status", headers=bearer(token))
                assert again.status_code == 200, again.text
        finally:
            event.remove(engine, "before_cursor_execute", statements)
        # A token whose session is not cached (another login) is looked up.
        other = (await login(client, "admin", ADMIN_PASSWORD))["access_token"]
        event.listen(engine, "before_cursor_execute", statements)
        try:
            fresh = await client.get("/api/models/status", headers=bearer(other))
        finally:
            event.remove(engine, "before_cursor_execute", statements)
    assert fresh.status_code == 200, fresh.text
    assert len(statements.about_sessions()) == 1, statements.seen


async def test_changes_through_this_process_apply_at_once(pg_url: str) -> None:
    async with auth_app(auth_settings(pg_url)) as (_, client):
        admin = (await login(client, "admin", ADMIN_PASSWORD))["access_token"]
        bob = await create_user(client, admin, "bob")
        carol = await create_user(client, admin, "carol", role="admin")

        # Logout: the access token's session ends at once.
        session = await login(client, "bob", USER_PASSWORD)
        assert (
            await client.get("/api/auth/me", headers=bearer(session["access_token"]))
        ).is_success
        out = await client.post(
            "/api/auth/logout",
            json={"refresh_token": session["refresh_token"]},
            headers=bearer(session["access_token"]),
        )
        assert out.status_code in (200, 204), out.text
        after_logout = await client.get("/v1/models", headers=bearer(session["access_token"]))

        # Demotion: an admin's cached session loses the admin role at once.
        carol_token = (await login(client, "carol", USER_PASSWORD))["access_token"]
        assert (await client.get("/admin/api/users", headers=bearer(carol_token))).is_success
        demoted = await client.patch(
            f"/admin/api/users/{carol['id']}", json={"role": "user"}, headers=bearer(admin)
        )
        assert demoted.status_code == 200, demoted.text
        after_demotion = await client.get("/admin/api/users", headers=bearer(carol_token))

        # Deactivation: refused at once.
        bob_token = (await login(client, "bob", USER_PASSWORD))["access_token"]
        assert (await client.get("/v1/models", headers=bearer(bob_token))).is_success
        deactivated = await client.patch(
            f"/admin/api/users/{bob['id']}", json={"is_active": False}, headers=bearer(admin)
        )
        assert deactivated.status_code == 200, deactivated.text
        after_deactivation = await client.get("/v1/models", headers=bearer(bob_token))

        # A password change ends every session of the user, the cached one included.
        carol_session = await login(client, "carol", USER_PASSWORD)
        carol_token = carol_session["access_token"]
        assert (await client.get("/api/auth/me", headers=bearer(carol_token))).is_success
        changed = await client.patch(
            "/api/auth/me",
            json={"current_password": USER_PASSWORD, "new_password": USER_PASSWORD + "-new"},
            headers=bearer(carol_token),
        )
        assert changed.status_code == 200, changed.text
        after_password = await client.get("/v1/models", headers=bearer(carol_token))
    assert_openai_error(after_logout, 401, "invalid_token")
    assert_openai_error(after_demotion, 403)
    assert_openai_error(after_deactivation, 401, "invalid_token")
    assert_openai_error(after_password, 401, "invalid_token")


async def test_a_change_made_elsewhere_applies_within_the_cache_lifetime(
    pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Another gateway process (or an operator in the database) revokes the session: this one
    # keeps serving the cached session for at most the cache's lifetime, then refuses it.
    monkeypatch.setattr(SESSION_CACHE, "ttl_s", 2.0)
    async with auth_app(auth_settings(pg_url)) as (app, client):
        token = (await login(client, "admin", ADMIN_PASSWORD))["access_token"]
        assert (await client.get("/v1/models", headers=bearer(token))).is_success
        cached_at = time.monotonic()
        async with app.state.resources.db_engine.begin() as conn:
            await conn.execute(text("UPDATE refresh_tokens SET revoked_at = now()"))
        still = await client.get("/v1/models", headers=bearer(token))
        within_s = time.monotonic() - cached_at
        await asyncio.sleep(max(0.0, 2.1 - (time.monotonic() - cached_at)))
        refused = await client.get("/v1/models", headers=bearer(token))
    assert within_s < 2.0  # otherwise the first check below says nothing
    assert still.status_code == 200, still.text  # documented: up to the cache's lifetime
    assert_openai_error(refused, 401, "invalid_token")


async def test_a_forged_token_for_a_cached_session_is_refused(pg_url: str) -> None:
    settings = auth_settings(pg_url)
    async with auth_app(settings) as (_, client):
        token = (await login(client, "admin", ADMIN_PASSWORD))["access_token"]
        assert (await client.get("/v1/models", headers=bearer(token))).is_success
        claims = jwt.decode(token, options={"verify_signature": False})
        header = jwt.get_unverified_header(token)
        # The same claims (so the same cache entry) signed with another secret, and unsigned.
        forged = jwt.encode(claims, "not-the-gateway-secret-" * 2, algorithm=header["alg"])
        unsigned = jwt.encode(claims, "", algorithm="none")
        expired = jwt.encode(
            {**claims, "exp": int(time.time()) - 3600},
            "not-the-gateway-secret-" * 2,
            algorithm=header["alg"],
        )
        answers = [
            await client.get("/v1/models", headers=bearer(t)) for t in (forged, unsigned, expired)
        ]
        genuine = await client.get("/v1/models", headers=bearer(token))
    for answer in answers:
        assert_openai_error(answer, 401, "invalid_token")
    assert genuine.status_code == 200


def test_a_lookup_older_than_an_invalidation_is_not_stored() -> None:
    cache = SessionCache(ttl_s=60)
    user, family = uuid.uuid4(), uuid.uuid4()
    principal = Principal(user_id=user, username="u", role="user", tier="standard", via="jwt")
    generation = cache.generation
    cache.invalidate_families({family})  # a logout committed while the lookup was in flight
    cache.put(user, family, principal, generation=generation)
    assert cache.get(user, family) is None
    cache.put(user, family, principal, generation=cache.generation)
    assert cache.get(user, family) == principal
    cache.invalidate_user(user)
    assert cache.get(user, family) is None
    assert len(cache) == 0


def test_the_cache_is_bounded_and_expires() -> None:
    cache = SessionCache(ttl_s=60, max_entries=3)
    users = [uuid.uuid4() for _ in range(4)]
    for user in users:
        principal = Principal(user_id=user, username="u", role="user", tier="free", via="jwt")
        cache.put(user, None, principal, generation=cache.generation)
    assert len(cache) == 3
    assert cache.get(users[0], None) is None  # the least recently used went first
    expired = SessionCache(ttl_s=0.0)
    principal = Principal(user_id=users[0], username="u", role="user", tier="free", via="jwt")
    expired.put(users[0], None, principal, generation=expired.generation)
    assert expired.get(users[0], None) is None


def test_a_verified_token_is_remembered_only_until_it_expires() -> None:
    cache = SessionCache(ttl_s=60)
    user, family = uuid.uuid4(), uuid.uuid4()
    cache.remember_verified("token-a", user, family, time.time() + 60)
    cache.remember_verified("token-b", user, family, time.time() - 1)
    assert cache.verified("token-a") == (user, family)
    assert cache.verified("token-b") is None  # expired: verified again, and refused
    assert cache.verified("token-c") is None
    # Remembering a token says nothing of its session: that is looked up as before.
    assert cache.get(user, family) is None
    cache.clear()
    assert cache.verified("token-a") is None
