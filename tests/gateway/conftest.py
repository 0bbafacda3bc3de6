"""Fixtures of every gateway test (helpers in tests/helpers/app.py)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from gateway.auth.session_cache import SESSION_CACHE
from gateway.keys.service import KEY_CACHE
from gateway.migrate import upgrade


@pytest.fixture(autouse=True)
def _fresh_credential_caches() -> None:
    # The key and session caches are process-wide: no lookup may carry over from another
    # test's database.
    KEY_CACHE.clear()
    SESSION_CACHE.clear()


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    """A migrated, empty SQLite database file."""
    url = f"sqlite+aiosqlite:///{tmp_path / 'gateway.db'}"
    upgrade(url)
    return url


@pytest.fixture
async def pg_url(postgres_url: str) -> str:
    """A fresh, migrated Postgres database for this test."""
    await asyncio.to_thread(upgrade, postgres_url)
    return postgres_url
