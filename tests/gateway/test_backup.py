"""`vllm-gateway backup` / `restore` on real SQLite and Postgres (pg_dump, pg_restore): a backup
taken while the gateway runs, restored into an empty database, gives a gateway where the users
log in, the keys authenticate and the conversations are all there."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.backup import BackupError, backup, restore
from tests.helpers.app import TEST_SECRET
from tests.helpers.auth import (
    ADMIN_PASSWORD,
    USER_PASSWORD,
    auth_app,
    auth_settings,
    bearer,
    create_user,
    login,
)
from tests.helpers.postgres import PostgresServer, find_pg_bin


async def cli(command: str, url: str, file: Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    """`python -m gateway backup|restore FILE` with DATABASE_URL=url, as an operator runs it."""
    env = {
        "PATH": os.environ.get("PATH", ""),
        "ENVIRONMENT": "production",
        "JWT_SECRET": TEST_SECRET,
        "DATABASE_URL": url,
        "LOG_FORMAT": "json",
    }
    argv = [sys.executable, "-m", "gateway", command, str(file)]
    if url.startswith("postgresql"):
        argv += ["--pg-bin", str(find_pg_bin())]
    return await asyncio.to_thread(
        subprocess.run, argv, capture_output=True, text=True, env=env, cwd=cwd, timeout=120,
        check=False,
    )  # fmt: skip


MESSAGES = [
    {"role": "user", "content": "정기 백업은 어떻게 하나요?"},
    {"role": "assistant", "content": "pg_dump, or the sqlite3 backup API.", "model": "tiny"},
]
IMPORTED = {
    "version": 1,
    "conversation": {"title": "Backups", "model": "tiny"},
    "messages": MESSAGES,
}


async def populate(client: httpx.AsyncClient) -> dict[str, Any]:
    """A user, a key of theirs and two conversations, all made through the API."""
    admin = await login(client, "admin", ADMIN_PASSWORD, path="/admin/api/login")
    username = f"dana-{uuid.uuid4().hex[:6]}"
    await create_user(client, admin["access_token"], username)
    user = await login(client, username, USER_PASSWORD)
    created = await client.post(
        "/api/keys", json={"description": "laptop"}, headers=bearer(user["access_token"])
    )
    assert created.status_code == 201, created.text
    key = created.json()["key"]
    imported = await client.post("/api/conversations/import", json=IMPORTED, headers=bearer(key))
    assert imported.status_code == 201, imported.text
    empty = await client.post(
        "/api/conversations", json={"title": "Empty"}, headers=bearer(user["access_token"])
    )
    assert empty.status_code == 201, empty.text
    return {
        "username": username,
        "key": key,
        "conversations": {imported.json()["id"], empty.json()["id"]},
        "imported": imported.json()["id"],
    }


async def check_restored(client: httpx.AsyncClient, made: dict[str, Any]) -> None:
    """The user logs in, the key authenticates, the conversations and messages are back."""
    user = await login(client, made["username"], USER_PASSWORD)
    await login(client, "admin", ADMIN_PASSWORD, path="/admin/api/login")
    listed = await client.get("/api/conversations", headers=bearer(made["key"]))
    assert listed.status_code == 200, listed.text
    assert {c["id"] for c in listed.json()["data"]} == made["conversations"]
    detail = await client.get(
        f"/api/conversations/{made['imported']}", headers=bearer(user["access_token"])
    )
    assert detail.status_code == 200, detail.text
    assert [(m["role"], m["content"]) for m in detail.json()["messages"]] == [
        (m["role"], m["content"]) for m in MESSAGES
    ]
    keys = await client.get("/api/keys", headers=bearer(user["access_token"]))
    assert [k["description"] for k in keys.json()["data"]] == ["laptop"]
    wrong = await client.get("/api/conversations", headers=bearer(made["key"] + "x"))
    assert wrong.status_code == 401


async def round_trip(source_url: str, target_url: str, tmp_path: Path) -> None:
    """Populate through the API, back up while the gateway runs, restore, check."""
    dump = tmp_path / "gateway.backup"
    async with auth_app(auth_settings(source_url)) as (_, client):
        made = await populate(client)
        taken = await cli("backup", source_url, dump, tmp_path)
        assert taken.returncode == 0, taken.stderr
        # The running gateway is not disturbed by the backup.
        assert (
            await client.get("/api/conversations", headers=bearer(made["key"]))
        ).status_code == 200
    assert dump.stat().st_size > 0
    assert not list(tmp_path.glob(".*.partial"))

    restored = await cli("restore", target_url, dump, tmp_path)
    assert restored.returncode == 0, restored.stderr
    # A second restore would merge into live data: refused, and nothing changes.
    again = await cli("restore", target_url, dump, tmp_path)
    assert again.returncode == 1
    assert "already holds" in again.stderr

    async with auth_app(auth_settings(target_url, ADMIN_PASSWORD=None)) as (_, client):
        await check_restored(client, made)
    # An existing backup file is never overwritten.
    refused = await cli("backup", source_url, dump, tmp_path)
    assert refused.returncode == 1
    assert "exists" in refused.stderr


async def test_sqlite_backup_restores_users_keys_and_conversations(
    sqlite_url: str, tmp_path: Path
) -> None:
    target = tmp_path / "restored" / "gateway.db"
    await round_trip(sqlite_url, f"sqlite+aiosqlite:///{target}", tmp_path)
    # The backup is one self-contained SQLite file (no -wal beside it).
    conn = sqlite3.connect(tmp_path / "gateway.backup")
    try:
        assert conn.execute("PRAGMA journal_mode").fetchone() == ("delete",)
        assert conn.execute("SELECT count(*) FROM users").fetchone()[0] == 2
    finally:
        conn.close()


@pytest.mark.postgres
async def test_postgres_backup_restores_users_keys_and_conversations(
    pg_url: str, postgres_server: PostgresServer, tmp_path: Path
) -> None:
    name = f"restored_{uuid.uuid4().hex[:12]}"
    target = postgres_server.create_database(name)
    try:
        await round_trip(pg_url, target, tmp_path)
        # pg_dump's custom format, readable by pg_restore --list.
        listing = await asyncio.to_thread(
            subprocess.run,
            [str(find_pg_bin() / "pg_restore"), "--list", str(tmp_path / "gateway.backup")],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        assert "TABLE public users" in listing.stdout
    finally:
        postgres_server.drop_database(name)


def test_bad_requests_are_refused_with_a_reason(tmp_path: Path) -> None:
    with pytest.raises(BackupError, match="not found"):
        backup(f"sqlite+aiosqlite:///{tmp_path / 'missing.db'}", tmp_path / "b.db")
    with pytest.raises(BackupError, match="in a file"):
        backup("sqlite+aiosqlite:///:memory:", tmp_path / "b.db")
    with pytest.raises(BackupError, match="does not exist"):
        backup(f"sqlite+aiosqlite:///{tmp_path / 'x.db'}", tmp_path / "no" / "b.db")
    with pytest.raises(BackupError, match="not found"):
        restore(f"sqlite+aiosqlite:///{tmp_path / 'x.db'}", tmp_path / "missing.backup")
    stranger = tmp_path / "stranger.db"
    sqlite3.connect(stranger).execute("CREATE TABLE t (x)").connection.commit()
    with pytest.raises(BackupError, match="not a backup of a gateway database"):
        restore(f"sqlite+aiosqlite:///{tmp_path / 'x.db'}", stranger)
    assert not (tmp_path / "x.db").exists()
    with pytest.raises(BackupError, match="pg_dump not found"):
        backup("postgresql+asyncpg://u@127.0.0.1:1/db", tmp_path / "p.dump", pg_bin=tmp_path)
