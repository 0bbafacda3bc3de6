"""Users: create, read, list, change (the last active admin is kept), and the first admin at
startup. What must also end sessions (deactivation, demotion) goes through `gateway.auth.service`.
"""

from __future__ import annotations

import secrets
import sys
import uuid
from collections.abc import Sequence

from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from gateway.errors import GatewayError
from gateway.logging import get_logger
from gateway.principal import Role, Tier
from gateway.settings import Settings
from gateway.users import passwords
from gateway.users.models import User

log = get_logger(__name__)

MIN_PASSWORD_CHARS = 8


# -- Administration --------------------------------------------------------------------------------


async def get_user(*, session: AsyncSession, user_id: uuid.UUID) -> User | None:
    """A user by id."""
    return await session.get(User, user_id)


async def list_users(*, session: AsyncSession, limit: int = 100, offset: int = 0) -> Sequence[User]:
    """Users, oldest first."""
    result = await session.scalars(
        select(User).order_by(User.created_at, User.id).limit(limit).offset(offset)
    )
    return result.all()


async def count_users(*, session: AsyncSession) -> int:
    """How many users exist."""
    return int(await session.scalar(select(func.count()).select_from(User)) or 0)


async def create_user(
    *,
    session: AsyncSession,
    username: str,
    password: str | None,
    role: Role = Role.USER,
    tier: Tier = Tier.STANDARD,
    email: str | None = None,
) -> User:
    """Create a user; without a password it is a service account (API keys only)."""
    if await session.scalar(select(User.id).where(User.username == username)) is not None:
        raise _username_taken()
    user = User(
        username=username,
        password_hash=await passwords.hash_password(password) if password is not None else None,
        role=role.value,
        tier=tier.value,
        email=email,
        is_active=True,
    )
    session.add(user)
    try:
        await session.commit()
    except IntegrityError:
        await session.rollback()
        raise _username_taken() from None
    log.info("user_created", user_id=str(user.id), role=user.role)
    return user


def _username_taken() -> GatewayError:
    return GatewayError(409, "That username is taken.", code="username_taken", param="username")


async def count_active_admins(*, session: AsyncSession) -> int:
    """How many active admins exist (the last one is never demoted or deactivated)."""
    count = await session.scalar(
        select(func.count())
        .select_from(User)
        .where(User.role == Role.ADMIN.value, User.is_active.is_(True))
    )
    return int(count or 0)


# -- Startup ---------------------------------------------------------------------------------------


async def ensure_first_admin(*, settings: Settings, session: AsyncSession) -> None:
    """Create the first admin when no admin exists: ADMIN_USERNAME with ADMIN_PASSWORD.

    Without ADMIN_PASSWORD, development makes one up and prints it once to stderr (never
    through the logger); production only warns. There is no built-in default password.
    """
    has_admin = await session.scalar(select(User.id).where(User.role == Role.ADMIN.value).limit(1))
    if has_admin is not None:
        return
    username = settings.ADMIN_USERNAME
    generated = settings.ADMIN_PASSWORD is None
    if settings.ADMIN_PASSWORD is not None:
        password = settings.ADMIN_PASSWORD.get_secret_value()
    elif settings.is_development:
        password = secrets.token_urlsafe(18)
    else:
        log.warning(
            "no_admin_account",
            detail="no admin user exists: set ADMIN_PASSWORD (and ADMIN_USERNAME) and restart, "
            "or run `vllm-gateway create-admin --username NAME`",
        )
        return
    if len(password) < MIN_PASSWORD_CHARS:
        log.warning(
            "admin_password_too_short",
            detail=f"ADMIN_PASSWORD has fewer than {MIN_PASSWORD_CHARS} characters; "
            "no admin was created",
        )
        return
    if await session.scalar(select(User.id).where(User.username == username)) is not None:
        log.warning(
            "admin_username_taken",
            detail=f"user {username!r} exists but is not an admin; it was not promoted. "
            "Run `vllm-gateway create-admin --username NAME` to make an admin.",
        )
        return
    session.add(
        User(
            username=username,
            password_hash=await passwords.hash_password(password),
            role=Role.ADMIN.value,
            tier=Tier.PREMIUM.value,
            is_active=True,
        )
    )
    try:
        await session.commit()
    except IntegrityError:
        # Another worker created it at the same moment.
        await session.rollback()
        return
    log.info("admin_created", username=username, source="generated" if generated else "settings")
    if generated:
        sys.stderr.write(
            f"\n  Development admin account: {username} / {password}\n"
            "  (shown once; set ADMIN_PASSWORD to choose it, or reset it with "
            "`vllm-gateway create-admin`)\n\n"
        )
        sys.stderr.flush()


async def bootstrap_identity(
    *, settings: Settings, session_factory: async_sessionmaker[AsyncSession]
) -> None:
    """Startup: create the first admin if needed; a database that is down only delays that."""
    try:
        async with session_factory() as session:
            await ensure_first_admin(settings=settings, session=session)
    except (SQLAlchemyError, OSError, TimeoutError) as exc:
        # The class name only: a database error's text can carry statement parameters.
        log.warning("admin_bootstrap_skipped", error=type(exc).__name__)
