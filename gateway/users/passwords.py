"""Password hashing: argon2id with RFC 9106's low-memory profile (64 MiB, t=3, p=4).

That profile is above OWASP's minimum (19 MiB, t=2, p=1). Hashes made with older, weaker
parameters still verify and are replaced at the next successful login (`needs_rehash`).
Hashing takes a fraction of a second of CPU, so the async helpers run it in a thread.
"""

from __future__ import annotations

import asyncio
import functools
import secrets

from argon2 import PasswordHasher, profiles
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

# Longer inputs gain nothing and only cost time; the API schemas cap passwords at this length.
MAX_PASSWORD_CHARS = 1024

_HASHER = PasswordHasher.from_parameters(profiles.RFC_9106_LOW_MEMORY)


def hash_password_sync(password: str) -> str:
    """The argon2id hash (PHC string, salt included) of a password; blocking."""
    return _HASHER.hash(password)


def verify_password_sync(password_hash: str, password: str) -> bool:
    """True when the password matches the hash; blocking, constant-time inside the library.

    The password is always hashed with the stored hash's salt and parameters, so sending the
    stored hash itself as the password fails like any other wrong password (no pass-the-hash).
    """
    if len(password) > MAX_PASSWORD_CHARS:
        return False
    try:
        return _HASHER.verify(password_hash, password)
    except (VerifyMismatchError, VerificationError, InvalidHashError):
        return False


def needs_rehash(password_hash: str) -> bool:
    """True when the hash was made with other parameters than today's (cheap: parses only)."""
    try:
        return _HASHER.check_needs_rehash(password_hash)
    except (InvalidHashError, ValueError):
        return True


async def hash_password(password: str) -> str:
    """`hash_password_sync` in a worker thread."""
    return await asyncio.to_thread(hash_password_sync, password)


async def verify_password(password_hash: str, password: str) -> bool:
    """`verify_password_sync` in a worker thread."""
    return await asyncio.to_thread(verify_password_sync, password_hash, password)


@functools.cache
def dummy_hash() -> str:
    """A hash of a random string: unknown users are checked against it, so they take as long."""
    return hash_password_sync(secrets.token_urlsafe(32))
