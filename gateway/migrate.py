"""Run Alembic migrations from code (the CLI and the test suite use this)."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from alembic import command
from alembic.config import Config

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def alembic_config(url: str) -> Config:
    """An Alembic config pointing at this project's scripts and the given database."""
    cfg = Config(str(PROJECT_ROOT / "alembic.ini"))
    cfg.set_main_option("script_location", str(PROJECT_ROOT / "alembic"))
    cfg.attributes["url"] = url
    # The gateway's own logging setup stays in charge when migrating from code.
    cfg.attributes["configure_logger"] = False
    return cfg


def upgrade(url: str, revision: str = "head") -> None:
    """Apply migrations up to `revision` (blocking)."""
    _ensure_sqlite_dir(url)
    _in_thread(command.upgrade, alembic_config(url), revision)


def downgrade(url: str, revision: str = "base") -> None:
    """Undo migrations down to `revision` (blocking)."""
    _in_thread(command.downgrade, alembic_config(url), revision)


def _in_thread(func: Callable[[Config, str], None], cfg: Config, revision: str) -> None:
    # env.py drives an async engine with asyncio.run(); a private thread keeps that event loop
    # apart from any loop of the caller (asyncio.run would otherwise reset the caller's loop).
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="alembic") as pool:
        pool.submit(func, cfg, revision).result()


def _ensure_sqlite_dir(url: str) -> None:
    prefix = "sqlite+aiosqlite:///"
    if url.startswith(prefix) and ":memory:" not in url:
        Path(url[len(prefix) :]).expanduser().parent.mkdir(parents=True, exist_ok=True)
