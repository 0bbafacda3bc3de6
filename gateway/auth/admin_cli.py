"""`vllm-gateway create-admin`: create an admin account, or promote one and reset its password."""

from __future__ import annotations

import asyncio
import getpass
import re
import sys

from gateway import migrate
from gateway.auth import service
from gateway.db import create_engine, create_session_factory
from gateway.settings import Settings
from gateway.users.service import MIN_PASSWORD_CHARS

_USERNAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$")
_MAX_PASSWORD_CHARS = 1024


def read_password(*, from_stdin: bool) -> str:
    """The new password: the first line of stdin, or typed twice at a hidden prompt."""
    if from_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    else:
        password = getpass.getpass("Password: ")
        if getpass.getpass("Repeat password: ") != password:
            raise SystemExit("the passwords differ")
    if not MIN_PASSWORD_CHARS <= len(password) <= _MAX_PASSWORD_CHARS:
        raise SystemExit(
            f"the password needs {MIN_PASSWORD_CHARS} to {_MAX_PASSWORD_CHARS} characters"
        )
    return password


def create_admin(settings: Settings, *, username: str, password_stdin: bool) -> None:
    """Make `username` an active admin with a password read from stdin or a prompt."""
    if not _USERNAME.match(username):
        raise SystemExit("the username may hold letters, digits and . _ @ - (at most 64)")
    password = read_password(from_stdin=password_stdin)
    if settings.AUTO_MIGRATE:
        migrate.upgrade(settings.DATABASE_URL)
    created = asyncio.run(_create(settings, username, password))
    # Never echo the password: only what happened.
    sys.stderr.write(f"admin {username!r} {'created' if created else 'updated'}\n")


async def _create(settings: Settings, username: str, password: str) -> bool:
    engine = create_engine(settings.DATABASE_URL, pool_size=1)
    try:
        async with create_session_factory(engine)() as session:
            return await service.create_or_promote_admin(
                session=session, username=username, password=password
            )
    finally:
        await engine.dispose()
