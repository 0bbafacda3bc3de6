"""Sessions and account security: password login, refresh-token rotation, logout, and the user
changes that must end sessions (deactivation, demotion, a password change).

Sessions are refresh-token families. Login starts a family; each refresh marks the presented
token used and issues a new pair in the same family. A refresh token presented a second time
means it was stolen (or replayed): the whole family is revoked, and the access tokens of a
revoked family are refused too (`load_session_user`). Deactivating a user revokes every family
and drops their keys from the key cache; every change that ends sessions or changes a user drops
them from the session cache too, after its commit.
"""

from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import ColumnElement, exists, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from gateway.auth import tokens
from gateway.auth.models import RefreshToken
from gateway.auth.session_cache import SESSION_CACHE
from gateway.errors import GatewayError
from gateway.keys.service import KEY_CACHE
from gateway.logging import get_logger
from gateway.principal import Role, Tier
from gateway.settings import Settings
from gateway.users import passwords
from gateway.users import service as users
from gateway.users.models import User

log = get_logger(__name__)


@dataclass(frozen=True)
class TokenPair:
    """What a login or refresh returns to the client."""

    access_token: str
    refresh_token: str
    expires_in: int


def invalid_credentials() -> GatewayError:
    """The one answer for an unknown user, a wrong password, or a disabled account."""
    return GatewayError(
        401,
        "Invalid username or password.",
        code="invalid_credentials",
        headers={"WWW-Authenticate": "Bearer"},
    )


def _now() -> datetime:
    return datetime.now(UTC)


# -- Login -----------------------------------------------------------------------------------------


async def authenticate(*, session: AsyncSession, username: str, password: str) -> User:
    """The active user with this username and password; otherwise `invalid_credentials`.

    Unknown users and password-less service accounts are checked against a dummy hash, so every
    failure costs one argon2 verification and they cannot be told apart by timing.
    """
    user = await session.scalar(select(User).where(User.username == username))
    stored = user.password_hash if user is not None else None
    if stored is None:
        await passwords.verify_password(await _dummy_hash(), password)
        raise invalid_credentials()
    if not await passwords.verify_password(stored, password):
        raise invalid_credentials()
    assert user is not None
    if not user.is_active:
        raise invalid_credentials()
    if passwords.needs_rehash(stored):
        # Parameters changed since this hash was made: upgrade it while the password is at hand.
        user.password_hash = await passwords.hash_password(password)
        log.info("password_rehashed", user_id=str(user.id))
    user.last_login_at = _now()
    await session.commit()
    return user


async def _dummy_hash() -> str:
    return await asyncio.to_thread(passwords.dummy_hash)


# -- Tokens ----------------------------------------------------------------------------------------


async def issue_tokens(*, session: AsyncSession, settings: Settings, user: User) -> TokenPair:
    """Start a new session (refresh family) for this user and return its first token pair."""
    pair = await _issue_pair(
        session=session, settings=settings, user_id=user.id, family_id=uuid.uuid4()
    )
    await session.commit()
    return pair


async def _issue_pair(
    *, session: AsyncSession, settings: Settings, user_id: uuid.UUID, family_id: uuid.UUID
) -> TokenPair:
    access = tokens.issue_token(settings, user_id=user_id, kind="access", family_id=family_id)
    refresh = tokens.issue_token(settings, user_id=user_id, kind="refresh", family_id=family_id)
    session.add(
        RefreshToken(
            id=refresh.jti, user_id=user_id, family_id=family_id, expires_at=refresh.expires_at
        )
    )
    return TokenPair(
        access_token=access.token, refresh_token=refresh.token, expires_in=access.lifetime_s
    )


async def refresh(*, session: AsyncSession, settings: Settings, refresh_token: str) -> TokenPair:
    """Exchange a refresh token for a new pair, once; a second use revokes its whole family."""
    claims = tokens.decode_token(settings, refresh_token, expected_type="refresh")
    now = _now()
    # Atomic check-and-set: of two concurrent uses, exactly one wins; the other is a reuse.
    claimed = await session.execute(
        update(RefreshToken)
        .where(
            RefreshToken.id == claims.jti,
            RefreshToken.user_id == claims.user_id,
            RefreshToken.used_at.is_(None),
            RefreshToken.revoked_at.is_(None),
            RefreshToken.expires_at > now,
        )
        .values(used_at=now)
        .returning(RefreshToken.family_id)
    )
    family_id = claimed.scalar_one_or_none()
    if family_id is None:
        row = await session.get(RefreshToken, claims.jti)
        if row is not None and row.user_id == claims.user_id and row.used_at is not None:
            await _revoke_families(session, RefreshToken.family_id == row.family_id, now)
            await session.commit()
            SESSION_CACHE.invalidate_families({row.family_id})
            log.warning(
                "refresh_token_reused",
                user_id=str(row.user_id),
                family_id=str(row.family_id),
                detail="a used refresh token came back: its session was revoked",
            )
        raise tokens.invalid_token()
    user = await session.get(User, claims.user_id)
    if user is None or not user.is_active:
        await session.rollback()
        raise tokens.invalid_token()
    pair = await _issue_pair(
        session=session, settings=settings, user_id=user.id, family_id=family_id
    )
    await session.commit()
    return pair


async def logout(
    *,
    session: AsyncSession,
    settings: Settings,
    refresh_token: str | None,
    access_token: str | None,
) -> None:
    """Revoke the session of a refresh token and/or of an access token (both must verify)."""
    families: set[uuid.UUID] = set()
    if access_token is not None:
        access = tokens.decode_token(settings, access_token, expected_type="access")
        if access.family_id is not None:
            families.add(access.family_id)
    if refresh_token is not None:
        claims = tokens.decode_token(settings, refresh_token, expected_type="refresh")
        row = await session.get(RefreshToken, claims.jti)
        if row is not None and row.user_id == claims.user_id:
            families.add(row.family_id)
    if not families:
        raise GatewayError(
            400,
            "Nothing to log out: send a refresh token or an access token.",
            code="no_session",
        )
    await _revoke_families(session, RefreshToken.family_id.in_(families), _now())
    await session.commit()
    SESSION_CACHE.invalidate_families(families)


async def revoke_user_sessions(*, session: AsyncSession, user_id: uuid.UUID) -> None:
    """Revoke every refresh family of a user (their access tokens stop working too)."""
    await _revoke_families(session, RefreshToken.user_id == user_id, _now())


async def _revoke_families(
    session: AsyncSession, where: ColumnElement[bool], now: datetime
) -> None:
    await session.execute(
        update(RefreshToken).where(where, RefreshToken.revoked_at.is_(None)).values(revoked_at=now)
    )


async def load_session_user(
    *, session: AsyncSession, user_id: uuid.UUID, family_id: uuid.UUID | None
) -> User | None:
    """The user behind an access token: active, and its session (family) not revoked."""
    revoked = (
        exists()
        .where(RefreshToken.family_id == family_id, RefreshToken.revoked_at.is_not(None))
        .correlate(None)
    )
    row = (
        await session.execute(select(User, revoked.label("revoked")).where(User.id == user_id))
    ).first()
    if row is None:
        return None
    user: User = row[0]
    if not user.is_active or row[1]:
        return None
    return user


# -- Self-service ----------------------------------------------------------------------------------


async def update_own_account(
    *,
    session: AsyncSession,
    user_id: uuid.UUID,
    email: str | None,
    set_email: bool,
    current_password: str | None,
    new_password: str | None,
) -> User:
    """Change one's own email and/or password (the current password is required for the latter).

    A password change ends every session of the user, this one included.
    """
    user = await session.get(User, user_id)
    if user is None or not user.is_active:
        raise tokens.invalid_token()
    if new_password is not None:
        if (
            current_password is None
            or user.password_hash is None
            or not await passwords.verify_password(user.password_hash, current_password)
        ):
            raise GatewayError(
                403,
                "The current password is wrong.",
                code="wrong_password",
                param="current_password",
            )
        user.password_hash = await passwords.hash_password(new_password)
        await revoke_user_sessions(session=session, user_id=user.id)
    if set_email:
        user.email = email
    await session.commit()
    if new_password is not None:
        _forget_cached_keys(user.id)
    return user


async def update_user(
    *,
    session: AsyncSession,
    user_id: uuid.UUID,
    is_active: bool | None = None,
    role: Role | None = None,
    tier: Tier | None = None,
) -> User:
    """Change a user's state, role or tier (admin only: the route requires the admin role).

    Deactivating revokes every session; the last active admin can be neither demoted nor
    deactivated, so the gateway never locks its operators out.
    """
    user = await session.get(User, user_id, with_for_update=True)
    if user is None:
        raise GatewayError(404, "No such user.", code="user_not_found")
    loses_admin = (
        user.role == Role.ADMIN
        and user.is_active
        and (is_active is False or (role is not None and role != Role.ADMIN))
    )
    if loses_admin and await users.count_active_admins(session=session) <= 1:
        raise GatewayError(
            409,
            "This is the last active admin; make another admin first.",
            code="last_admin",
        )
    if role is not None:
        user.role = role.value
    if tier is not None:
        user.tier = tier.value
    if is_active is not None and is_active != user.is_active:
        user.is_active = is_active
        if not is_active:
            await revoke_user_sessions(session=session, user_id=user.id)
    await session.commit()
    _forget_cached_keys(user.id)
    log.info(
        "user_updated",
        user_id=str(user.id),
        role=user.role,
        tier=user.tier,
        is_active=user.is_active,
    )
    return user


async def set_active(*, session: AsyncSession, user_id: uuid.UUID, active: bool) -> User:
    """Enable or disable a user."""
    return await update_user(session=session, user_id=user_id, is_active=active)


async def deactivate(*, session: AsyncSession, user_id: uuid.UUID) -> User:
    """Disable a user and end all their sessions."""
    return await set_active(session=session, user_id=user_id, active=False)


def _forget_cached_keys(user_id: uuid.UUID) -> None:
    # API key and access-token lookups cache the user for a few seconds; a changed role, tier
    # or state, or ended sessions, must apply to the next request, not after the cache expires.
    # Called after the change is committed (see SessionCache's generation).
    KEY_CACHE.invalidate_user(user_id)
    SESSION_CACHE.invalidate_user(user_id)


async def create_or_promote_admin(*, session: AsyncSession, username: str, password: str) -> bool:
    """Make `username` an active admin with this password; True when the user was created.

    An existing user is promoted, reactivated, given the new password and logged out everywhere.
    """
    user = await session.scalar(select(User).where(User.username == username))
    password_hash = await passwords.hash_password(password)
    if user is None:
        session.add(
            User(
                username=username,
                password_hash=password_hash,
                role=Role.ADMIN.value,
                tier=Tier.PREMIUM.value,
                is_active=True,
            )
        )
        await session.commit()
        log.info("admin_created", username=username)
        return True
    user.role = Role.ADMIN.value
    user.is_active = True
    user.password_hash = password_hash
    await revoke_user_sessions(session=session, user_id=user.id)
    await session.commit()
    _forget_cached_keys(user.id)
    log.info("admin_promoted", user_id=str(user.id))
    return False
