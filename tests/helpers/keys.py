"""API key tests: users added straight to the database."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from gateway.db import create_engine, create_session_factory
from gateway.migrate import upgrade
from gateway.users.models import User


async def add_user(
    sessions: async_sessionmaker[AsyncSession],
    username: str | None = None,
    *,
    tier: str = "standard",
    role: str = "user",
    active: bool = True,
) -> User:
    """Insert a user with a dummy password hash."""
    async with sessions() as session:
        user = User(
            username=username or f"user-{uuid.uuid4().hex[:8]}",
            password_hash="$argon2id$not-a-real-hash",
            role=role,
            tier=tier,
            is_active=active,
        )
        session.add(user)
        await session.commit()
        return user


# Fixtures of the key and usage tests (their conftests import them by name).


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
async def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A migrated database: a SQLite file, then a fresh Postgres database."""
    if request.param == "sqlite":
        url = f"sqlite+aiosqlite:///{tmp_path / 'gateway.db'}"
    else:
        url = request.getfixturevalue("postgres_url")
    await asyncio.to_thread(upgrade, url)
    return url


@pytest.fixture
async def engine(db_url: str) -> AsyncIterator[AsyncEngine]:
    """An engine on `db_url`, disposed after the test."""
    eng = create_engine(db_url)
    try:
        yield eng
    finally:
        await eng.dispose()


@pytest.fixture
def sessions(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    """Sessions on `engine`."""
    return create_session_factory(engine)
