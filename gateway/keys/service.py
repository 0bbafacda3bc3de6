"""API keys: issue, list, change, revoke, and authenticate (with a short in-process cache).

Keys are `prefix + secrets.token_urlsafe(32)`: 256 random bits. Only the SHA-256 digest of a key
is stored. A fast hash is the right tool here, unlike for passwords: the input already carries
256 bits of entropy, so there is nothing for a slow hash to protect against brute force, and a
fast one keeps authentication cheap on every proxied request.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import time
import uuid
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, NamedTuple

from sqlalchemy import or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import make_transient_to_detached

from gateway.db import utcnow
from gateway.errors import GatewayError
from gateway.fields import normalize_grants
from gateway.keys.models import ApiKey
from gateway.logging import get_logger
from gateway.principal import Role, Tier
from gateway.settings import Settings
from gateway.users.models import User

log = get_logger(__name__)

# Rank of each tier: a caller may hand out a tier only up to its own.
TIER_RANK = {Tier.FREE.value: 0, Tier.STANDARD.value: 1, Tier.PREMIUM.value: 2}
# How many random characters after the prefix are kept for display (about 30 of 256 bits).
DISPLAY_RANDOM_CHARS = 5
# Successful lookups are reused this long. Revocation or a change made through this process
# drops the entry at once; a change made through ANOTHER gateway process (or directly in the
# database) reaches this one within KEY_CACHE_TTL_S seconds.
KEY_CACHE_TTL_S = 5.0
KEY_CACHE_MAX_ENTRIES = 10_000
# last_used_at is written at most this often per key, never on every request.
LAST_USED_RESOLUTION = timedelta(seconds=60)
# A credential longer than this is not a key of ours: refused before hashing.
MAX_RAW_KEY_CHARS = 256
_SERVICE_ACCOUNT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$")


class GeneratedKey(NamedTuple):
    """A new key: the raw value (shown once), its display prefix, and its stored digest."""

    raw_key: str
    display_prefix: str
    digest: str


def key_digest(raw_key: str) -> str:
    """SHA-256 hex digest of a raw key: the only form of a key the database holds."""
    return hashlib.sha256(raw_key.encode("utf-8")).hexdigest()


def generate_key(*, prefix: str) -> GeneratedKey:
    """Make a new key: `prefix` + 256 random bits (URL-safe base64)."""
    raw = prefix + secrets.token_urlsafe(32)
    return GeneratedKey(raw, raw[: len(prefix) + DISPLAY_RANDOM_CHARS], key_digest(raw))


def as_utc(value: datetime | None) -> datetime | None:
    """The value as an aware UTC datetime; naive values are taken as UTC.

    SQLite drops the offset on write and hands back naive UTC wall times, so every datetime is
    converted to UTC before it is stored.
    """
    if value is None:
        return None
    if value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value.astimezone(UTC)


def key_status(key: ApiKey, *, now: datetime | None = None) -> str:
    """`active`, `revoked` or `expired`."""
    now = now or utcnow()
    if key.revoked_at is not None:
        return "revoked"
    expires_at = as_utc(key.expires_at)
    if expires_at is not None and expires_at <= now:
        return "expired"
    return "active"


# -- the lookup cache ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _CachedKey:
    expires_monotonic: float
    # Detached copies made once at put(): the request path only reads them, and building ORM
    # objects on every hit was most of what authentication cost per request (measured).
    # Callers must not attach them to a session or change them.
    key: ApiKey
    user: User
    # When the key stops being usable (its expiry; None: never), computed at put() so a hit
    # reads no ORM attribute; `usable` False for a key or owner that was unusable already.
    usable_until: datetime | None
    usable: bool


def _columns(obj: ApiKey | User) -> dict[str, Any]:
    return {attr.key: getattr(obj, attr.key) for attr in obj.__mapper__.column_attrs}


def _detached(cls: type[ApiKey] | type[User], columns: dict[str, Any]) -> Any:
    # A detached copy: the cache never holds an object that belongs to a request's session.
    obj = cls(**columns)
    make_transient_to_detached(obj)
    return obj


class KeyCache:
    """Successful key lookups by digest, each kept for `ttl_s` seconds (bounded, LRU).

    A generation counter guards against a lookup that read the database before a revocation
    committed storing its stale result after the revocation dropped the entry.
    """

    def __init__(self, *, ttl_s: float = KEY_CACHE_TTL_S, max_entries: int = KEY_CACHE_MAX_ENTRIES):
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self.generation = 0
        self._entries: OrderedDict[str, _CachedKey] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, digest: str) -> tuple[ApiKey, User] | None:
        """The cached key and owner (detached copies), or None when absent or stale."""
        entry = self._entries.get(digest)
        if entry is None:
            return None
        if entry.expires_monotonic <= time.monotonic():
            del self._entries[digest]
            return None
        self._entries.move_to_end(digest)
        return entry.key, entry.user

    def get_usable(self, digest: str, now: datetime) -> tuple[ApiKey, User] | None:
        """The cached key and owner when they are usable at `now`; None otherwise (absent,
        stale, revoked, expired or an inactive owner)."""
        entry = self._entries.get(digest)
        if entry is None or not entry.usable or entry.expires_monotonic <= time.monotonic():
            return None
        if entry.usable_until is not None and entry.usable_until <= now:
            return None
        return entry.key, entry.user

    def put(self, digest: str, key: ApiKey, user: User, *, generation: int) -> None:
        """Remember a successful lookup made when the generation was `generation`."""
        if self.ttl_s <= 0 or generation != self.generation:
            return
        self._entries[digest] = _CachedKey(
            time.monotonic() + self.ttl_s,
            _detached(ApiKey, _columns(key)),
            _detached(User, _columns(user)),
            as_utc(key.expires_at),
            key.revoked_at is None and user.is_active,
        )
        self._entries.move_to_end(digest)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    def invalidate(self, digest: str) -> None:
        """Forget one key (after it was revoked or changed)."""
        self.generation += 1
        self._entries.pop(digest, None)

    def invalidate_user(self, user_id: uuid.UUID) -> None:
        """Forget every key of a user (after the user was deactivated or changed)."""
        self.generation += 1
        for digest in [d for d, e in self._entries.items() if e.user.id == user_id]:
            del self._entries[digest]

    def clear(self) -> None:
        """Forget everything."""
        self.generation += 1
        self._entries.clear()


# One cache per process: the database is the source of truth, the cache only saves lookups.
KEY_CACHE = KeyCache()


# -- authentication --------------------------------------------------------------------------


def _usable(key: ApiKey, user: User, now: datetime) -> bool:
    return key_status(key, now=now) == "active" and user.is_active


def cached_usable_key(raw_key: str, cache: KeyCache | None = None) -> tuple[ApiKey, User] | None:
    """The key and owner from the cache alone when they are usable now; None: ask the database
    (a miss, or a hit that is no longer usable, which the full lookup then refuses)."""
    if not raw_key or len(raw_key) > MAX_RAW_KEY_CHARS:
        return None
    return (cache or KEY_CACHE).get_usable(key_digest(raw_key), utcnow())


async def authenticate_key(
    *, session: AsyncSession, raw_key: str, settings: Settings, cache: KeyCache = KEY_CACHE
) -> tuple[ApiKey, User] | None:
    """The key and its owner for a raw API key; None for unknown, revoked or expired keys and
    inactive owners.

    Keys are not required to carry the current `API_KEY_PREFIX`, so changing the setting does
    not lock out keys issued before. May commit `session` (the at-most-once-a-minute
    `last_used_at` write); call it before the request changes anything else.
    """
    del settings  # accepted so every credential check has the same call shape
    if not raw_key or len(raw_key) > MAX_RAW_KEY_CHARS:
        return None
    digest = key_digest(raw_key)
    now = utcnow()
    cached = cache.get(digest)
    if cached is not None:
        key, user = cached
        # Expiry is a property of time, not of the row: check it on every hit.
        return (key, user) if _usable(key, user, now) else None

    generation = cache.generation
    row = (
        await session.execute(
            select(ApiKey, User)
            .join(User, User.id == ApiKey.user_id)
            .where(ApiKey.digest == digest)
        )
    ).first()
    if row is None:
        return None
    key, user = row._tuple()
    # The index found the row; the constant-time compare keeps the final check free of timing.
    if not hmac.compare_digest(key.digest.encode(), digest.encode()):
        return None
    if not _usable(key, user, now):
        return None
    # Cached before the commit below, while every column is certainly loaded.
    cache.put(digest, key, user, generation=generation)
    last_used = as_utc(key.last_used_at)
    if last_used is None or now - last_used >= LAST_USED_RESOLUTION:
        await _touch(session, key, now)
    return key, user


async def _touch(session: AsyncSession, key: ApiKey, now: datetime) -> None:
    # The WHERE clause makes concurrent requests (or processes) write at most once a minute.
    stale = now - LAST_USED_RESOLUTION
    await session.execute(
        update(ApiKey)
        .where(ApiKey.id == key.id)
        .where(or_(ApiKey.last_used_at.is_(None), ApiKey.last_used_at < stale))
        .values(last_used_at=now)
        .execution_options(synchronize_session=False)
    )
    await session.commit()
    key.last_used_at = now


# -- management ------------------------------------------------------------------------------


def _check_tier(tier: str) -> str:
    if tier not in TIER_RANK:
        raise GatewayError(400, f"Unknown tier {tier!r}.", code="invalid_tier", param="tier")
    return tier


def _check_expiry(expires_at: datetime | None, now: datetime) -> datetime | None:
    expires_at = as_utc(expires_at)
    if expires_at is not None and expires_at <= now:
        raise GatewayError(
            400, "expires_at must be in the future.", code="invalid_expiry", param="expires_at"
        )
    return expires_at


def _normalize_models(models: list[str] | None) -> list[str] | None:
    if models is None:
        return None
    names = list(dict.fromkeys(name.strip() for name in models if name.strip()))
    if not names:
        raise GatewayError(
            400,
            "allowed_models must name at least one model (null allows every model).",
            code="invalid_models",
            param="allowed_models",
        )
    return names


def _check_models_within(
    requested: list[str] | None, allowed: Sequence[str] | None
) -> list[str] | None:
    """A caller limited to some models may only hand out a subset of them."""
    if allowed is None:
        return requested
    if requested is None:
        return list(allowed)
    beyond = [name for name in requested if name not in allowed]
    if beyond:
        raise GatewayError(
            403,
            f"Cannot grant models beyond your own: {', '.join(beyond)}.",
            code="models_not_allowed",
            param="allowed_models",
        )
    return requested


def _normalize_fields(fields: list[str] | None) -> list[str] | None:
    """Checked field grants (None when there are none); 400 naming a name that cannot be
    allowed (the schema checks the same; this is for callers of the service)."""
    try:
        names = normalize_grants(fields or ())
    except ValueError as exc:
        raise GatewayError(
            400, f"allowed_fields: {exc}.", code="invalid_fields", param="allowed_fields"
        ) from None
    return names or None


def _fields_for_admins() -> GatewayError:
    # Function-level authorization: a user must not widen what their own key may send.
    return GatewayError(
        403,
        "Only admins allow request fields for a key.",
        code="fields_not_allowed",
        param="allowed_fields",
    )


async def resolve_owner(session: AsyncSession, *, user_ref: str, tier: str | None) -> User:
    """The user a new key belongs to: an existing user's id or username; any other name gets
    a new service account (no password, role user) so `{"user_id": "dev-team"}` just works."""
    ref = user_ref.strip()
    try:
        user_id = uuid.UUID(ref)
    except ValueError:
        user_id = None
    if user_id is not None:
        user = await session.get(User, user_id)
        if user is None:
            raise GatewayError(404, "No user with this id.", code="user_not_found", param="user_id")
        return user
    existing = await _user_by_name(session, ref)
    if existing is not None:
        return existing
    if not _SERVICE_ACCOUNT_NAME.match(ref):
        raise GatewayError(
            400,
            "user_id must be a user id, or a name of 1-64 letters, digits and . _ @ -",
            code="invalid_user",
            param="user_id",
        )
    account = User(
        username=ref,
        password_hash=None,
        role=Role.USER.value,
        tier=_check_tier(tier or Tier.STANDARD.value),
        is_active=True,
    )
    session.add(account)
    try:
        await session.flush()
    except IntegrityError:
        # Created concurrently by another request: use that one.
        await session.rollback()
        existing = await _user_by_name(session, ref)
        if existing is None:
            raise
        return existing
    log.info("service_account_created", user_id=str(account.id))
    return account


async def get_owner(
    session: AsyncSession, *, user_id: uuid.UUID | None, minting_with_api_key: bool = False
) -> User:
    """The signed-in user who creates a key for itself; 403 for callers without an account, an
    inactive one, or credentials that are themselves an API key (keys do not mint keys)."""
    if minting_with_api_key:
        raise GatewayError(
            403, "Sign in to create API keys; an API key cannot create keys.", code="forbidden"
        )
    user = None if user_id is None else await session.get(User, user_id)
    if user is None or not user.is_active:
        raise GatewayError(403, "Keys belong to user accounts; sign in first.", code="forbidden")
    return user


async def _user_by_name(session: AsyncSession, username: str) -> User | None:
    result = await session.execute(select(User).where(User.username == username))
    return result.scalar_one_or_none()


async def create_key(
    session: AsyncSession,
    *,
    owner: User,
    tier: str | None,
    description: str,
    expires_at: datetime | None,
    allowed_models: list[str] | None,
    prefix: str,
    caller_id: uuid.UUID | None,
    caller_is_admin: bool,
    caller_tier: str,
    caller_allowed_models: Sequence[str] | None = None,
    allowed_fields: list[str] | None = None,
) -> tuple[ApiKey, str]:
    """Issue a key for `owner` and commit; returns the row and the raw key (shown once).

    Function-level authorization: a non-admin may only create keys for itself, with a tier up
    to its own and models within its own, and never allow request fields (admins only).
    """
    now = utcnow()
    if not caller_is_admin:
        if allowed_fields:
            raise _fields_for_admins()
        if caller_id is None or owner.id != caller_id:
            raise GatewayError(
                403, "You can only create keys for yourself.", code="forbidden", param="user_id"
            )
        tier = tier or caller_tier
        if TIER_RANK.get(_check_tier(tier), 99) > TIER_RANK.get(caller_tier, -1):
            raise GatewayError(
                403,
                f"Cannot create a {tier} key: your tier is {caller_tier}.",
                code="tier_not_allowed",
                param="tier",
            )
        allowed_models = _check_models_within(
            _normalize_models(allowed_models), caller_allowed_models
        )
    tier = _check_tier(tier or owner.tier)
    new = generate_key(prefix=prefix)
    key = ApiKey(
        user_id=owner.id,
        prefix=new.display_prefix,
        digest=new.digest,
        tier=tier,
        description=description,
        allowed_models=_normalize_models(allowed_models),
        allowed_fields=_normalize_fields(allowed_fields),
        expires_at=_check_expiry(expires_at, now),
    )
    session.add(key)
    await session.commit()
    # Ids only: never the key, its digest or its prefix.
    log.info("api_key_created", key_id=str(key.id), user_id=str(owner.id), tier=key.tier)
    return key, new.raw_key


async def list_keys(
    session: AsyncSession, *, user_id: uuid.UUID | None = None
) -> list[tuple[ApiKey, User]]:
    """Keys with their owners, newest first; only `user_id`'s keys when given."""
    query = select(ApiKey, User).join(User, User.id == ApiKey.user_id)
    if user_id is not None:
        query = query.where(ApiKey.user_id == user_id)
    query = query.order_by(ApiKey.created_at.desc(), ApiKey.id)
    return [row._tuple() for row in (await session.execute(query)).all()]


async def get_key(
    session: AsyncSession, *, key_id: uuid.UUID, owner_id: uuid.UUID | None = None
) -> tuple[ApiKey, User]:
    """One key and its owner; 404 when absent or (with `owner_id`) someone else's key, so the
    answer never tells that another user's key exists."""
    query = select(ApiKey, User).join(User, User.id == ApiKey.user_id).where(ApiKey.id == key_id)
    if owner_id is not None:
        query = query.where(ApiKey.user_id == owner_id)
    row = (await session.execute(query)).first()
    if row is None:
        raise GatewayError(404, "No such API key.", code="key_not_found")
    key, user = row._tuple()
    return key, user


async def update_key(
    session: AsyncSession,
    *,
    key: ApiKey,
    changes: dict[str, Any],
    caller_is_admin: bool,
    cache: KeyCache = KEY_CACHE,
) -> ApiKey:
    """Change description, tier and allowed_fields (admins only), expires_at or allowed_models,
    and commit.

    `changes` holds only the fields the client sent; None clears expires_at, allowed_models and
    allowed_fields.
    """
    if key.revoked_at is not None:
        raise GatewayError(409, "This key is revoked.", code="key_revoked")
    unknown = set(changes) - {
        "description",
        "tier",
        "expires_at",
        "allowed_models",
        "allowed_fields",
    }
    if unknown:
        raise GatewayError(400, f"Cannot change {', '.join(sorted(unknown))}.", code="invalid")
    if "tier" in changes:
        if not caller_is_admin:
            raise GatewayError(403, "Only admins change a key's tier.", code="forbidden")
        key.tier = _check_tier(changes["tier"])
    if "allowed_fields" in changes:
        if not caller_is_admin:
            raise _fields_for_admins()
        key.allowed_fields = _normalize_fields(changes["allowed_fields"])
    if "description" in changes:
        key.description = changes["description"] or ""
    if "expires_at" in changes:
        key.expires_at = _check_expiry(changes["expires_at"], utcnow())
    if "allowed_models" in changes:
        key.allowed_models = _normalize_models(changes["allowed_models"])
    await session.commit()
    # After the commit: a lookup racing the change then reads the new row.
    cache.invalidate(key.digest)
    log.info("api_key_updated", key_id=str(key.id), fields=sorted(changes))
    return key


async def revoke_key(session: AsyncSession, *, key: ApiKey, cache: KeyCache = KEY_CACHE) -> None:
    """Revoke a key for good (idempotent); it stops working in this process at once."""
    if key.revoked_at is None:
        key.revoked_at = utcnow()
        await session.commit()
        log.info("api_key_revoked", key_id=str(key.id), user_id=str(key.user_id))
    cache.invalidate(key.digest)
