"""Alembic migrations: upgrade/downgrade on empty Postgres and SQLite; models == migrations."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect
from sqlalchemy.engine import Connection

from gateway.db import create_engine
from gateway.migrate import downgrade, upgrade
from gateway.tables import Base


def _diff(connection: Connection) -> list[object]:
    context = MigrationContext.configure(connection, opts={"compare_type": True})
    return list(compare_metadata(context, Base.metadata))


def _tables(connection: Connection) -> set[str]:
    return set(inspect(connection).get_table_names())


async def _inspect(url: str) -> tuple[list[object], set[str]]:
    engine = create_engine(url)
    try:
        async with engine.connect() as conn:
            return await conn.run_sync(_diff), await conn.run_sync(_tables)
    finally:
        await engine.dispose()


async def _round_trip(url: str) -> None:
    await asyncio.to_thread(upgrade, url)
    diff, tables = await _inspect(url)
    assert diff == [], f"models and migrations disagree: {diff}"
    assert set(Base.metadata.tables) <= tables
    assert "alembic_version" in tables
    await asyncio.to_thread(downgrade, url)
    _, after = await _inspect(url)
    assert after <= {"alembic_version"}, f"downgrade left tables behind: {after}"
    # And up again: the downgrade really undid everything it created.
    await asyncio.to_thread(upgrade, url)
    diff, _ = await _inspect(url)
    assert diff == []


@pytest.mark.postgres
async def test_migrations_round_trip_on_empty_postgres(postgres_url: str) -> None:
    await _round_trip(postgres_url)


async def test_migrations_round_trip_on_empty_sqlite(tmp_path: Path) -> None:
    await _round_trip(f"sqlite+aiosqlite:///{tmp_path / 'fresh.db'}")


async def test_empty_database_differs_from_models(tmp_path: Path) -> None:
    # Guards the guard: without migrations the comparison must report the missing tables.
    url = f"sqlite+aiosqlite:///{tmp_path / 'empty.db'}"
    diff, _ = await _inspect(url)
    assert any(entry[0] == "add_table" for entry in diff)  # type: ignore[index]
