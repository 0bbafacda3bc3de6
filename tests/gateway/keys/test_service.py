"""Key service on SQLite and real Postgres: format, digest-only storage, authentication, authz."""

from __future__ import annotations

import asyncio
import hashlib
import re
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlalchemy import event, select, text, update
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from gateway.errors import GatewayError
from gateway.keys import service
from gateway.keys.models import ApiKey
from gateway.keys.service import KeyCache, authenticate_key, generate_key
from gateway.users.models import User
from tests.helpers.app import make_settings
from tests.helpers.keys import add_user

Sessions = async_sessionmaker[AsyncSession]
SETTINGS = make_settings()


async def _issue(sessions: Sessions, owner: User, **overrides: Any) -> tuple[ApiKey, str]:
    values: dict[str, Any] = {
        "tier": None,
        "description": "test key",
        "expires_at": None,
        "allowed_models": None,
        "prefix": SETTINGS.API_KEY_PREFIX,
        "caller_id": None,
        "caller_is_admin": True,
        "caller_tier": "premium",
    }
    values.update(overrides)
    async with sessions() as session:
        return await service.create_key(session, owner=owner, **values)


async def _auth(sessions: Sessions, raw: str, cache: KeyCache | None = None) -> Any:
    async with sessions() as session:
        return await authenticate_key(
            session=session,
            raw_key=raw,
            settings=SETTINGS,
            cache=service.KEY_CACHE if cache is None else cache,
        )


def test_generated_keys_have_the_prefix_256_random_bits_and_distinct_values() -> None:
    keys = [generate_key(prefix="sk-vcg-") for _ in range(2000)]
    assert len({k.raw_key for k in keys}) == len(keys)
    for raw, display, digest in keys[:50]:
        assert raw.startswith("sk-vcg-")
        body = raw[len("sk-vcg-") :]
        # token_urlsafe(32): 32 random bytes -> 43 base64url characters (256 bits).
        assert re.fullmatch(r"[A-Za-z0-9_-]{43}", body)
        assert display == raw[:12]
        assert len(display) <= 24
        assert digest == hashlib.sha256(raw.encode()).hexdigest()
    assert len({k.raw_key[7:9] for k in keys}) > 100  # not a constant or a counter


async def test_only_the_digest_is_stored(sessions: Sessions, engine: AsyncEngine) -> None:
    owner = await add_user(sessions)
    key, raw = await _issue(sessions, owner)
    async with engine.connect() as conn:
        rows = (await conn.execute(text("SELECT * FROM api_keys"))).all()
    dump = repr(rows)
    assert raw not in dump
    assert raw[len(SETTINGS.API_KEY_PREFIX) :] not in dump
    assert hashlib.sha256(raw.encode()).hexdigest() in dump
    assert key.prefix == raw[:12]


async def test_authenticate_accepts_the_key_and_refuses_its_digest(sessions: Sessions) -> None:
    owner = await add_user(sessions)
    key, raw = await _issue(sessions, owner)
    found = await _auth(sessions, raw)
    assert found is not None
    assert found[0].id == key.id
    assert found[1].id == owner.id
    # Pass-the-hash: the stored digest is not a credential.
    assert await _auth(sessions, key.digest) is None
    assert await _auth(sessions, "") is None
    assert await _auth(sessions, raw + "x") is None
    assert await _auth(sessions, raw[:-1]) is None
    assert await _auth(sessions, "sk-vcg-" + "A" * 5000) is None


async def test_revoked_key_stops_at_once_in_this_process(sessions: Sessions) -> None:
    owner = await add_user(sessions)
    key, raw = await _issue(sessions, owner)
    assert await _auth(sessions, raw) is not None  # now cached
    assert len(service.KEY_CACHE) == 1
    async with sessions() as session:
        row, _ = await service.get_key(session, key_id=key.id)
        await service.revoke_key(session, key=row)
    assert len(service.KEY_CACHE) == 0
    assert await _auth(sessions, raw) is None
    async with sessions() as session:
        row, _ = await service.get_key(session, key_id=key.id)
        assert row.revoked_at is not None
        await service.revoke_key(session, key=row)  # idempotent


async def test_revocation_by_another_process_is_seen_within_the_ttl(sessions: Sessions) -> None:
    owner = await add_user(sessions)
    key, raw = await _issue(sessions, owner)
    cache = KeyCache(ttl_s=0.2)
    assert await _auth(sessions, raw, cache) is not None
    async with sessions() as session:  # another process writes the database directly
        await session.execute(
            update(ApiKey).where(ApiKey.id == key.id).values(revoked_at=datetime.now(UTC))
        )
        await session.commit()
    assert await _auth(sessions, raw, cache) is not None  # documented: up to the TTL
    await asyncio.sleep(0.25)
    assert await _auth(sessions, raw, cache) is None


async def test_expired_key_is_refused(sessions: Sessions) -> None:
    owner = await add_user(sessions)
    key, raw = await _issue(sessions, owner, expires_at=datetime.now(UTC) + timedelta(hours=1))
    assert await _auth(sessions, raw) is not None
    # Expiry is checked on cache hits too: age the cached copy without touching the database.
    cached = service.KEY_CACHE.get(key.digest)
    assert cached is not None
    cached[0].expires_at = datetime.now(UTC) - timedelta(seconds=1)
    service.KEY_CACHE.put(key.digest, *cached, generation=service.KEY_CACHE.generation)
    assert await _auth(sessions, raw) is None
    # And in the database.
    service.KEY_CACHE.clear()
    async with sessions() as session:
        await session.execute(
            update(ApiKey)
            .where(ApiKey.id == key.id)
            .values(expires_at=datetime.now(UTC) - timedelta(minutes=1))
        )
        await session.commit()
    assert await _auth(sessions, raw) is None


async def test_inactive_owner_is_refused(sessions: Sessions) -> None:
    owner = await add_user(sessions)
    _, raw = await _issue(sessions, owner)
    assert await _auth(sessions, raw) is not None
    async with sessions() as session:
        await session.execute(update(User).where(User.id == owner.id).values(is_active=False))
        await session.commit()
    service.KEY_CACHE.invalidate_user(owner.id)
    assert await _auth(sessions, raw) is None


async def test_a_stale_lookup_cannot_refill_the_cache_after_invalidation(
    sessions: Sessions,
) -> None:
    owner = await add_user(sessions)
    key, raw = await _issue(sessions, owner)
    found = await _auth(sessions, raw, cache := KeyCache())
    assert found is not None
    generation = cache.generation
    cache.invalidate(key.digest)  # a revocation commits while a lookup was in flight
    cache.put(key.digest, *found, generation=generation)
    assert cache.get(key.digest) is None


async def test_last_used_is_written_at_most_once_a_minute(
    sessions: Sessions, engine: AsyncEngine
) -> None:
    owner = await add_user(sessions)
    key, raw = await _issue(sessions, owner)
    updates: list[str] = []

    def count(_c: Any, _cur: Any, statement: str, *_: Any) -> None:
        if statement.lstrip().upper().startswith("UPDATE API_KEYS"):
            updates.append(statement)

    event.listen(engine.sync_engine, "before_cursor_execute", count)
    try:
        for _ in range(5):
            assert await _auth(sessions, raw, KeyCache(ttl_s=0)) is not None
    finally:
        event.remove(engine.sync_engine, "before_cursor_execute", count)
    assert len(updates) == 1
    async with sessions() as session:
        stored = await session.scalar(select(ApiKey.last_used_at).where(ApiKey.id == key.id))
    assert stored is not None


async def test_cached_lookups_do_not_hit_the_database(
    sessions: Sessions, engine: AsyncEngine
) -> None:
    owner = await add_user(sessions)
    _, raw = await _issue(sessions, owner)
    assert await _auth(sessions, raw) is not None
    statements: list[str] = []

    def count(_c: Any, _cur: Any, statement: str, *_: Any) -> None:
        statements.append(statement)

    event.listen(engine.sync_engine, "before_cursor_execute", count)
    try:
        for _ in range(20):
            found = await _auth(sessions, raw)
            assert found is not None
            assert found[1].username == owner.username
    finally:
        event.remove(engine.sync_engine, "before_cursor_execute", count)
    assert statements == []


# -- function-level authorization ------------------------------------------------------------


async def test_non_admin_creates_keys_only_for_itself_within_its_tier(sessions: Sessions) -> None:
    alice = await add_user(sessions, tier="standard")
    bob = await add_user(sessions, tier="premium")
    as_alice = {"caller_id": alice.id, "caller_is_admin": False, "caller_tier": "standard"}
    with pytest.raises(GatewayError) as other:
        await _issue(sessions, bob, **as_alice)
    assert other.value.status_code == 403
    with pytest.raises(GatewayError) as higher:
        await _issue(sessions, alice, tier="premium", **as_alice)
    assert higher.value.status_code == 403
    key, _ = await _issue(sessions, alice, **as_alice)
    assert key.tier == "standard"  # default: the caller's own tier
    key, _ = await _issue(sessions, alice, tier="free", **as_alice)
    assert key.tier == "free"


async def test_non_admin_limited_to_models_cannot_grant_more(sessions: Sessions) -> None:
    alice = await add_user(sessions)
    caller = {
        "caller_id": alice.id,
        "caller_is_admin": False,
        "caller_tier": "standard",
        "caller_allowed_models": ["small"],
    }
    with pytest.raises(GatewayError) as beyond:
        await _issue(sessions, alice, allowed_models=["small", "big"], **caller)
    assert beyond.value.status_code == 403
    key, _ = await _issue(sessions, alice, **caller)
    assert key.allowed_models == ["small"]  # inherits the limit rather than widening it


async def test_bad_expiry_and_empty_model_list_are_refused(sessions: Sessions) -> None:
    owner = await add_user(sessions)
    with pytest.raises(GatewayError) as past:
        await _issue(sessions, owner, expires_at=datetime.now(UTC) - timedelta(seconds=1))
    assert past.value.status_code == 400
    with pytest.raises(GatewayError) as empty:
        await _issue(sessions, owner, allowed_models=[" "])
    assert empty.value.status_code == 400


async def test_update_changes_fields_and_drops_the_cache_entry(sessions: Sessions) -> None:
    owner = await add_user(sessions)
    key, raw = await _issue(sessions, owner, tier="free")
    assert await _auth(sessions, raw) is not None
    async with sessions() as session:
        row, _ = await service.get_key(session, key_id=key.id)
        with pytest.raises(GatewayError) as not_admin:
            await service.update_key(
                session, key=row, changes={"tier": "premium"}, caller_is_admin=False
            )
        assert not_admin.value.status_code == 403
        await service.update_key(
            session,
            key=row,
            changes={"tier": "premium", "allowed_models": ["m"], "description": "x"},
            caller_is_admin=True,
        )
    assert len(service.KEY_CACHE) == 0
    found = await _auth(sessions, raw)
    assert found is not None
    assert (found[0].tier, found[0].allowed_models, found[0].description) == ("premium", ["m"], "x")
    async with sessions() as session:
        row, _ = await service.get_key(session, key_id=key.id)
        await service.revoke_key(session, key=row)
        with pytest.raises(GatewayError) as revoked:
            await service.update_key(
                session, key=row, changes={"description": "y"}, caller_is_admin=True
            )
        assert revoked.value.status_code == 409


async def test_get_key_hides_other_users_keys(sessions: Sessions) -> None:
    alice = await add_user(sessions)
    bob = await add_user(sessions)
    key, _ = await _issue(sessions, alice)
    async with sessions() as session:
        with pytest.raises(GatewayError) as hidden:
            await service.get_key(session, key_id=key.id, owner_id=bob.id)
        assert hidden.value.status_code == 404
        with pytest.raises(GatewayError) as missing:
            await service.get_key(session, key_id=uuid.uuid4(), owner_id=alice.id)
        assert missing.value.status_code == 404
        assert (await service.get_key(session, key_id=key.id, owner_id=alice.id))[0].id == key.id


# -- owners by name (seed: "user_id": "dev-team") --------------------------------------------


async def test_unknown_name_becomes_a_service_account(sessions: Sessions) -> None:
    async with sessions() as session:
        owner = await service.resolve_owner(session, user_ref="dev-team", tier="premium")
        await session.commit()
    async with sessions() as session:
        account = (
            await session.execute(select(User).where(User.username == "dev-team"))
        ).scalar_one()
    assert account.id == owner.id
    assert account.password_hash is None
    assert (account.role, account.tier, account.is_active) == ("user", "premium", True)
    async with sessions() as session:  # the same name again: the same account
        again = await service.resolve_owner(session, user_ref="dev-team", tier="free")
        assert again.id == owner.id
        by_id = await service.resolve_owner(session, user_ref=str(owner.id), tier=None)
        assert by_id.id == owner.id


async def test_owner_reference_errors(sessions: Sessions) -> None:
    async with sessions() as session:
        with pytest.raises(GatewayError) as missing:
            await service.resolve_owner(session, user_ref=str(uuid.uuid4()), tier=None)
        assert missing.value.status_code == 404
        with pytest.raises(GatewayError) as bad:
            await service.resolve_owner(session, user_ref="no spaces; please", tier=None)
        assert bad.value.status_code == 400


async def test_only_an_admin_allows_request_fields(sessions: Sessions) -> None:
    alice = await add_user(sessions)
    as_alice = {"caller_id": alice.id, "caller_is_admin": False, "caller_tier": "standard"}
    with pytest.raises(GatewayError) as created:
        await _issue(sessions, alice, allowed_fields=["chat_template"], **as_alice)
    assert (created.value.status_code, created.value.param) == (403, "allowed_fields")
    key, raw = await _issue(sessions, alice, **as_alice)
    assert key.allowed_fields is None
    async with sessions() as session:
        row, _ = await service.get_key(session, key_id=key.id)
        with pytest.raises(GatewayError) as changed:
            await service.update_key(
                session,
                key=row,
                changes={"allowed_fields": ["chat_template"]},
                caller_is_admin=False,
            )
        assert changed.value.status_code == 403
        # An admin's grant is checked, kept once per field and seen by the next authentication.
        await service.update_key(
            session,
            key=row,
            changes={"allowed_fields": [" chat_template", "chatTemplate", "vllm_xargs"]},
            caller_is_admin=True,
        )
        with pytest.raises(GatewayError) as routed:
            await service.update_key(
                session, key=row, changes={"allowed_fields": ["base_url"]}, caller_is_admin=True
            )
        assert (routed.value.status_code, routed.value.param) == (400, "allowed_fields")
    found = await _auth(sessions, raw)
    assert found is not None
    assert found[0].allowed_fields == ["chat_template", "vllm_xargs"]
    async with sessions() as session:
        row, _ = await service.get_key(session, key_id=key.id)
        await service.update_key(
            session, key=row, changes={"allowed_fields": []}, caller_is_admin=True
        )
    found = await _auth(sessions, raw)
    assert found is not None
    assert found[0].allowed_fields is None
