"""Key routes through the running app on real Postgres: the seed's admin API and self-service."""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy import select, text

from gateway.auth import service as auth_service
from gateway.keys.models import ApiKey
from gateway.users.models import User
from tests.helpers.app import make_settings, running_app

pytestmark = pytest.mark.postgres

ADMIN_KEY = "adm-" + "Q7x2Lp9Zr4Tw8Ks1"
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}


@pytest.fixture
async def gateway(pg_url: str) -> AsyncIterator[tuple[FastAPI, httpx.AsyncClient]]:
    settings = make_settings(DATABASE_URL=pg_url, REQUIRE_AUTH=True, ADMIN_API_KEY=ADMIN_KEY)
    async with running_app(settings) as (app, client):
        yield app, client


async def _login(
    app: FastAPI, username: str, *, tier: str = "standard", role: str = "user"
) -> tuple[User, dict[str, str]]:
    """A user with a real access token (the JWT path of the auth package)."""
    state = app.state.resources
    async with state.session_factory() as session:
        user = User(
            username=username,
            password_hash="$argon2id$not-a-real-hash",
            role=role,
            tier=tier,
            is_active=True,
        )
        session.add(user)
        await session.commit()
        pair = await auth_service.issue_tokens(session=session, settings=state.settings, user=user)
    return user, {"Authorization": f"Bearer {pair.access_token}"}


def _no_secrets(body: Any, *secrets: str) -> None:
    dump = repr(body)
    for secret in secrets:
        assert secret not in dump


async def test_seed_curl_creates_a_service_account_and_a_key_shown_once(
    gateway: tuple[FastAPI, httpx.AsyncClient],
) -> None:
    app, client = gateway
    reply = await client.post(
        "/admin/api/keys",
        headers=ADMIN,
        json={"user_id": "dev-team", "tier": "premium", "description": "Development team key"},
    )
    assert reply.status_code == 201, reply.text
    created = reply.json()
    raw = created["key"]
    assert raw.startswith("sk-vcg-")
    assert len(raw) == len("sk-vcg-") + 43
    assert created["prefix"] == raw[:12]
    assert (created["username"], created["tier"], created["status"]) == (
        "dev-team",
        "premium",
        "active",
    )
    assert "digest" not in created
    async with app.state.resources.session_factory() as session:
        account = (
            await session.execute(select(User).where(User.username == "dev-team"))
        ).scalar_one()
        assert account.password_hash is None
        assert account.role == "user"
        assert account.tier == "premium"
        assert str(account.id) == created["user_id"]

    listed = await client.get("/admin/api/keys", headers=ADMIN)
    assert listed.status_code == 200
    [entry] = listed.json()["data"]
    assert entry["id"] == created["id"]
    assert entry["prefix"] == created["prefix"]
    _no_secrets(listed.json(), raw, raw[12:], hashlib.sha256(raw.encode()).hexdigest())
    assert "key" not in entry
    assert "digest" not in entry

    # The key works as a credential; its digest does not.
    me = await client.get("/api/keys", headers={"Authorization": f"Bearer {raw}"})
    assert me.status_code == 200
    assert [k["id"] for k in me.json()["data"]] == [created["id"]]
    digest = hashlib.sha256(raw.encode()).hexdigest()
    stolen = await client.get("/api/keys", headers={"Authorization": f"Bearer {digest}"})
    assert stolen.status_code == 401
    _no_secrets(stolen.text, digest)


async def test_admin_updates_and_revokes_keys(gateway: tuple[FastAPI, httpx.AsyncClient]) -> None:
    _, client = gateway
    created = (
        await client.post("/admin/api/keys", headers=ADMIN, json={"user_id": "svc", "tier": "free"})
    ).json()
    key_id, raw = created["id"], created["key"]
    changed = await client.put(
        f"/admin/api/keys/{key_id}",
        headers=ADMIN,
        json={"tier": "standard", "description": "renamed", "allowed_models": ["tiny"]},
    )
    assert changed.status_code == 200, changed.text
    assert (changed.json()["tier"], changed.json()["allowed_models"]) == ("standard", ["tiny"])
    cleared = await client.put(
        f"/admin/api/keys/{key_id}", headers=ADMIN, json={"allowed_models": None}
    )
    assert cleared.json()["allowed_models"] is None
    assert cleared.json()["tier"] == "standard"
    unknown_field = await client.put(
        f"/admin/api/keys/{key_id}", headers=ADMIN, json={"digest": "x"}
    )
    assert unknown_field.status_code == 400
    # What the document forbids is refused, naming the field; the key stays as it was.
    for body, param in (
        ({"tier": None}, "tier"),
        ({"allowed_models": []}, "allowed_models"),
        ({"allowed_models": [" \u3000"]}, "allowed_models.0"),
    ):
        refused = await client.put(f"/admin/api/keys/{key_id}", headers=ADMIN, json=body)
        assert refused.status_code == 400, (body, refused.text)
        assert refused.json()["error"]["param"] == param, refused.text
    padded = await client.post("/admin/api/keys", headers=ADMIN, json={"user_id": " svc"})
    assert padded.status_code == 400, padded.text
    assert padded.json()["error"]["param"] == "user_id"
    kept = (await client.get("/admin/api/keys", headers=ADMIN)).json()["data"]
    assert [(k["tier"], k["allowed_models"]) for k in kept] == [("standard", None)]

    as_key = {"Authorization": f"Bearer {raw}"}
    assert (await client.get("/api/keys", headers=as_key)).status_code == 200
    assert (await client.delete(f"/admin/api/keys/{key_id}", headers=ADMIN)).status_code == 204
    assert (await client.get("/api/keys", headers=as_key)).status_code == 401
    assert (await client.delete(f"/admin/api/keys/{key_id}", headers=ADMIN)).status_code == 204
    missing = await client.delete(f"/admin/api/keys/{uuid.uuid4()}", headers=ADMIN)
    assert missing.status_code == 404
    listed = (await client.get("/admin/api/keys", headers=ADMIN)).json()["data"]
    assert listed[0]["status"] == "revoked"
    assert listed[0]["is_active"] is False


async def test_admin_routes_need_an_admin(gateway: tuple[FastAPI, httpx.AsyncClient]) -> None:
    app, client = gateway
    _, user = await _login(app, "alice")
    some_id = uuid.uuid4()
    for method, path in [
        ("POST", "/admin/api/keys"),
        ("GET", "/admin/api/keys"),
        ("PUT", f"/admin/api/keys/{some_id}"),
        ("DELETE", f"/admin/api/keys/{some_id}"),
    ]:
        body = {"user_id": "alice"} if method in {"POST", "PUT"} else None
        anonymous = await client.request(method, path, json=body)
        assert anonymous.status_code == 401, (method, path)
        denied = await client.request(method, path, json=body, headers=user)
        assert denied.status_code == 403, (method, path)
    async with app.state.resources.session_factory() as session:
        assert (await session.scalar(select(ApiKey.id))) is None


async def test_self_service_keys_stay_within_the_callers_rights(
    gateway: tuple[FastAPI, httpx.AsyncClient],
) -> None:
    app, client = gateway
    alice, as_alice = await _login(app, "alice", tier="standard")
    bob, as_bob = await _login(app, "bob")

    mine = await client.post("/api/keys", headers=as_alice, json={"description": "laptop"})
    assert mine.status_code == 201, mine.text
    assert (mine.json()["tier"], mine.json()["user_id"]) == ("standard", str(alice.id))

    higher = await client.post("/api/keys", headers=as_alice, json={"tier": "premium"})
    assert higher.status_code == 403
    for smuggled in (
        {"user_id": str(bob.id)},
        {"role": "admin"},
        {"scopes": ["*"]},
        {"allowed_routes": ["/*"]},
        {"tier": "root"},
    ):
        refused = await client.post("/api/keys", headers=as_alice, json=smuggled)
        assert refused.status_code in {400, 422}, smuggled

    # A key cannot mint keys: a leaked key must not outlive its own revocation.
    as_key = {"Authorization": f"Bearer {mine.json()['key']}"}
    minted = await client.post("/api/keys", headers=as_key, json={})
    assert minted.status_code == 403

    theirs = (await client.post("/api/keys", headers=as_bob, json={})).json()
    listed = (await client.get("/api/keys", headers=as_alice)).json()["data"]
    assert [k["id"] for k in listed] == [mine.json()["id"]]
    _no_secrets(listed, mine.json()["key"], theirs["key"])

    # Another user's key id: 404, exactly like an id that does not exist, and nothing changes.
    other = await client.delete(f"/api/keys/{theirs['id']}", headers=as_alice)
    nowhere = await client.delete(f"/api/keys/{uuid.uuid4()}", headers=as_alice)
    assert other.status_code == nowhere.status_code == 404
    assert other.json()["error"]["message"] == nowhere.json()["error"]["message"]
    assert (
        await client.get("/api/keys", headers={"Authorization": f"Bearer {theirs['key']}"})
    ).status_code == 200

    assert (
        await client.delete(f"/api/keys/{mine.json()['id']}", headers=as_alice)
    ).status_code == 204
    assert (await client.get("/api/keys", headers=as_key)).status_code == 401
    assert (await client.get("/api/keys")).status_code == 401


async def test_admin_key_and_anonymous_callers_have_no_keys_of_their_own(
    pg_url: str,
) -> None:
    settings = make_settings(DATABASE_URL=pg_url, REQUIRE_AUTH=False, ADMIN_API_KEY=ADMIN_KEY)
    async with running_app(settings) as (_, client):
        assert (await client.post("/api/keys", json={})).status_code == 403
        assert (await client.post("/api/keys", headers=ADMIN, json={})).status_code == 403


async def test_nothing_secret_in_the_database_or_logs(
    gateway: tuple[FastAPI, httpx.AsyncClient], capsys: pytest.CaptureFixture[str]
) -> None:
    app, client = gateway
    raw = (await client.post("/admin/api/keys", headers=ADMIN, json={"user_id": "ops"})).json()[
        "key"
    ]
    for _ in range(3):
        await client.get("/api/keys", headers={"Authorization": f"Bearer {raw}"})
    await client.get("/api/keys", headers={"Authorization": f"Bearer {raw}x"})
    async with app.state.resources.db_engine.connect() as conn:
        dump = repr((await conn.execute(text("SELECT * FROM api_keys"))).all())
        dump += repr((await conn.execute(text("SELECT * FROM users"))).all())
    assert raw not in dump
    assert raw[12:] not in dump
    captured = capsys.readouterr()
    assert raw[12:] not in captured.out + captured.err
