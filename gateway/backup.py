"""Backups of the gateway's database, and restores into an empty one.

SQLite: Python's sqlite3 backup API, which copies a consistent snapshot page by page while the
gateway keeps writing (WAL mode: readers never block the writer); copying the file with `cp`
could catch it half-written. Postgres: `pg_dump --format=custom` (one consistent snapshot, no
lock that blocks the gateway) and `pg_restore` in a single transaction. The password travels in
PGPASSWORD, never on a command line that `ps` shows. A restore refuses a database that already
holds tables: it never merges into, or overwrites, live data.
"""

from __future__ import annotations

import asyncio
import glob
import os
import re
import shutil
import sqlite3
import subprocess
from pathlib import Path

from sqlalchemy import inspect
from sqlalchemy.engine import URL, make_url

from gateway.db import create_engine

# The table every migrated gateway database has (Alembic's): a backup without it is not ours.
_MARKER_TABLE = "alembic_version"


class BackupError(Exception):
    """A backup or restore that cannot be done; the message says why and what to do."""


def backup(database_url: str, target: Path, *, pg_bin: Path | None = None) -> None:
    """Write a backup of the database at `database_url` to `target` (a new file)."""
    target = target.expanduser()
    if target.exists():
        raise BackupError(f"{target} exists; name a new file (e.g. with the date in it)")
    if not target.parent.is_dir():
        raise BackupError(f"directory {target.parent} does not exist")
    url = make_url(database_url)
    if url.get_backend_name() == "sqlite":
        _sqlite_backup(_sqlite_path(url), target)
    elif url.get_backend_name() == "postgresql":
        partial = _partial(target)
        try:
            _run(
                _pg_tool("pg_dump", pg_bin),
                ["--format=custom", f"--file={partial}", "--dbname", _pg_database(url)],
                url,
            )
        except BackupError:
            partial.unlink(missing_ok=True)
            raise
        partial.replace(target)
    else:
        raise BackupError(f"cannot back up a {url.get_backend_name()} database")


def restore(database_url: str, source: Path, *, pg_bin: Path | None = None) -> None:
    """Restore the backup `source` into the (empty or missing) database at `database_url`."""
    source = source.expanduser()
    if not source.is_file():
        raise BackupError(f"backup file {source} not found")
    url = make_url(database_url)
    if url.get_backend_name() == "sqlite":
        path = _sqlite_path(url)
        if path.exists() and _sqlite_tables(path):
            raise BackupError(
                f"{path} already holds tables; stop the gateway and move that file away first"
            )
        if _MARKER_TABLE not in _sqlite_tables(source):
            raise BackupError(f"{source} is not a backup of a gateway database")
        path.parent.mkdir(parents=True, exist_ok=True)
        _sqlite_backup(source, path, overwrite=True)
    elif url.get_backend_name() == "postgresql":
        if tables := asyncio.run(_postgres_tables(database_url)):
            raise BackupError(
                f"database {url.database} already holds {len(tables)} tables; restore into a "
                "new, empty database (createdb) and point DATABASE_URL at it"
            )
        _run(
            _pg_tool("pg_restore", pg_bin),
            [
                "--no-owner", "--no-privileges", "--single-transaction", "--exit-on-error",
                "--dbname", _pg_database(url), str(source),
            ],
            url,
        )  # fmt: skip
    else:
        raise BackupError(f"cannot restore into a {url.get_backend_name()} database")


# -- SQLite --------------------------------------------------------------------------------------


def _sqlite_path(url: URL) -> Path:
    if not url.database or url.database == ":memory:" or url.database.startswith("file:"):
        raise BackupError("only a SQLite database in a file can be backed up or restored")
    return Path(url.database).expanduser()


def _partial(target: Path) -> Path:
    # Written beside the target and renamed when complete: a failed run leaves no file that
    # looks like a good backup.
    return target.with_name(f".{target.name}.partial")


def _read_only(path: Path) -> sqlite3.Connection:
    if not path.is_file():
        raise BackupError(f"SQLite database {path} not found")
    return sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)


def _sqlite_backup(source: Path, target: Path, *, overwrite: bool = False) -> None:
    partial = _partial(target)
    partial.unlink(missing_ok=True)
    src = _read_only(source)
    try:
        dst = sqlite3.connect(partial)
        try:
            src.backup(dst)  # all pages in one step: one consistent snapshot
            check = dst.execute("PRAGMA quick_check").fetchone()
            # One self-contained file: the copy is left in rollback-journal mode; the gateway
            # switches it back to WAL when it opens it.
            dst.execute("PRAGMA journal_mode=DELETE")
        finally:
            dst.close()
    except sqlite3.Error as exc:
        partial.unlink(missing_ok=True)
        raise BackupError(f"SQLite backup failed: {exc}") from None
    finally:
        src.close()
    if check is None or check[0] != "ok":
        partial.unlink(missing_ok=True)
        raise BackupError(f"the copy of {source} failed its integrity check")
    if overwrite:
        # A database left without tables (an empty file) is replaced, with any journal of it.
        for stale in (Path(f"{target}-wal"), Path(f"{target}-shm")):
            stale.unlink(missing_ok=True)
    partial.replace(target)


def _sqlite_tables(path: Path) -> set[str]:
    conn = _read_only(path)
    try:
        rows = conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchall()
    except sqlite3.DatabaseError as exc:
        raise BackupError(f"{path} is not a SQLite database ({exc})") from None
    finally:
        conn.close()
    return {name for (name,) in rows}


# -- Postgres ------------------------------------------------------------------------------------


async def _postgres_tables(database_url: str) -> list[str]:
    engine = create_engine(database_url, pool_size=1)
    try:
        async with engine.connect() as conn:
            return await conn.run_sync(lambda sync: inspect(sync).get_table_names())
    finally:
        await engine.dispose()


def _pg_database(url: URL) -> str:
    if not url.database:
        raise BackupError("DATABASE_URL names no database")
    return url.database


def _pg_tool(name: str, pg_bin: Path | None) -> str:
    """`pg_bin/name`, else `name` on PATH, else the newest /usr/lib/postgresql/*/bin/name."""
    if pg_bin is not None:
        candidates = [str(pg_bin / name)]
    else:
        on_path = shutil.which(name)
        installed = sorted(
            glob.glob(f"/usr/lib/postgresql/*/bin/{name}"),
            key=lambda p: int(re.sub(r"\D", "", Path(p).parent.parent.name) or 0),
            reverse=True,
        )
        candidates = [*([on_path] if on_path else []), *installed]
    for candidate in candidates:
        if os.access(candidate, os.X_OK):
            return candidate
    raise BackupError(
        f"{name} not found; install the PostgreSQL client (apt-get install postgresql-client, "
        "of the server's major version or newer) or pass --pg-bin DIR"
    )


def _libpq_env(url: URL) -> dict[str, str]:
    """The connection as libpq environment variables (the password stays out of argv)."""
    env = dict(os.environ)
    for variable, value in (
        ("PGHOST", url.host),
        ("PGPORT", None if url.port is None else str(url.port)),
        ("PGUSER", url.username),
        ("PGPASSWORD", url.password),
    ):
        if value:
            env[variable] = str(value)
    ssl = url.query.get("sslmode") or url.query.get("ssl")
    if isinstance(ssl, str):
        # asyncpg's ssl=true means "require"; libpq's sslmode names are accepted as they are.
        env["PGSSLMODE"] = "require" if ssl.lower() in {"true", "1"} else ssl
    return env


def _run(tool: str, args: list[str], url: URL) -> None:
    proc = subprocess.run(
        [tool, *args], env=_libpq_env(url), capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        raise BackupError(f"{Path(tool).name} failed (exit {proc.returncode}): {proc.stderr}")
