"""argon2id parameters, verification, pass-the-hash, and rehash on login."""

from __future__ import annotations

import re

from argon2 import PasswordHasher
from sqlalchemy import select, update

from gateway.db import create_engine, create_session_factory
from gateway.users import passwords
from gateway.users.models import User
from tests.helpers.auth import (
    ADMIN_PASSWORD,
    ResponseLog,
    assert_openai_error,
    auth_app,
    auth_settings,
    login,
)

_PHC = re.compile(r"^\$argon2id\$v=19\$m=(\d+),t=(\d+),p=(\d+)\$")


def _params(password_hash: str) -> tuple[int, int, int]:
    match = _PHC.match(password_hash)
    assert match, password_hash
    m, t, p = (int(g) for g in match.groups())
    return m, t, p


def test_hash_is_argon2id_at_least_owasp_minimum() -> None:
    stored = passwords.hash_password_sync("correct horse battery staple")
    m, t, p = _params(stored)
    assert m >= 19456
    assert t >= 2
    assert p >= 1
    assert passwords.verify_password_sync(stored, "correct horse battery staple")
    assert not passwords.verify_password_sync(stored, "correct horse battery stapler")
    assert not passwords.needs_rehash(stored)


def test_the_hash_itself_is_not_a_password() -> None:
    stored = passwords.hash_password_sync("s3cret-enough")
    assert not passwords.verify_password_sync(stored, stored)
    assert not passwords.verify_password_sync(stored, "")
    assert not passwords.verify_password_sync("not a hash", "s3cret-enough")
    assert not passwords.verify_password_sync(stored, "x" * (passwords.MAX_PASSWORD_CHARS + 1))


def test_weaker_parameters_need_a_rehash() -> None:
    weak = PasswordHasher(time_cost=2, memory_cost=19456, parallelism=1).hash("pw-pw-pw-pw")
    assert passwords.verify_password_sync(weak, "pw-pw-pw-pw")
    assert passwords.needs_rehash(weak)
    assert passwords.needs_rehash("garbage")


async def test_login_stores_argon2id_rehashes_weak_hashes_and_refuses_the_hash(
    pg_url: str, response_log: ResponseLog
) -> None:
    settings = auth_settings(pg_url)
    engine = create_engine(pg_url, pool_size=1)
    sessions = create_session_factory(engine)
    try:
        async with auth_app(settings, response_log) as (_, client):
            async with sessions() as session:
                stored = await session.scalar(
                    select(User.password_hash).where(User.username == "admin")
                )
            assert stored is not None
            assert stored.startswith("$argon2id$")
            m, t, p = _params(stored)
            assert (m >= 19456, t >= 2, p >= 1) == (True, True, True)

            # Pass-the-hash: the stored hash sent as the password is just a wrong password.
            refused = await client.post(
                "/api/auth/login", json={"username": "admin", "password": stored}
            )
            assert_openai_error(refused, 401, "invalid_credentials")

            # An old, weaker hash still logs in and is replaced by one with today's parameters.
            weak = PasswordHasher(time_cost=2, memory_cost=19456, parallelism=1).hash(
                ADMIN_PASSWORD
            )
            async with sessions() as session:
                await session.execute(
                    update(User).where(User.username == "admin").values(password_hash=weak)
                )
                await session.commit()
            await login(client, "admin", ADMIN_PASSWORD)
            async with sessions() as session:
                rehashed = await session.scalar(
                    select(User.password_hash).where(User.username == "admin")
                )
            assert rehashed is not None
            assert rehashed != weak
            assert _params(rehashed) == _params(stored)
            assert not passwords.needs_rehash(rehashed)
            await login(client, "admin", ADMIN_PASSWORD)
    finally:
        await engine.dispose()
