"""Fixtures of this folder (helpers in tests/helpers/auth.py)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from gateway.migrate import upgrade
from tests.helpers.auth import ResponseLog
from tests.helpers.postgres import PostgresServer


@pytest.fixture(scope="module")
def module_pg_url(postgres_server: PostgresServer) -> Iterator[str]:
    """A migrated Postgres database shared by one module's read-mostly tests."""
    name = f"t_{uuid.uuid4().hex[:16]}"
    url = postgres_server.create_database(name)
    upgrade(url)
    yield url
    if postgres_server.is_running():
        postgres_server.drop_database(name)


@pytest.fixture
def response_log() -> ResponseLog:
    """Collects responses of `auth_app` clients."""
    return ResponseLog()
