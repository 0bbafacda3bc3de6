"""The leader lease on a real PostgreSQL: one holder at a time, a higher term each time it is
taken, free again the moment the holder's session ends."""

from __future__ import annotations

import asyncio

from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from gateway.migrate import upgrade
from gateway.replicas.lease import LeaderLease


async def test_one_holder_at_a_time_and_each_taker_gets_a_higher_term(postgres_url: str) -> None:
    await asyncio.to_thread(upgrade, postgres_url)
    first = LeaderLease(postgres_url, holder="a", url="http://a:8080")
    second = LeaderLease(postgres_url, holder="b", url="http://b:8080")
    try:
        assert await second.leader() is None  # nobody led yet
        assert await first.try_acquire() == 1
        assert await second.try_acquire() is None
        assert await first.held()
        info = await second.leader()
        assert info is not None
        assert (info.holder, info.url, info.term) == ("a", "http://a:8080", 1)
        await first.release()
        assert not await first.held()
        assert await second.try_acquire() == 2
        assert await first.try_acquire() is None
    finally:
        await first.release()
        await second.release()


async def test_a_holder_whose_session_is_killed_loses_the_lease(postgres_url: str) -> None:
    await asyncio.to_thread(upgrade, postgres_url)
    holder = LeaderLease(postgres_url, holder="a", url="http://a:8080")
    taker = LeaderLease(postgres_url, holder="b", url="http://b:8080")
    admin = create_async_engine(postgres_url)
    try:
        assert await holder.try_acquire() == 1
        async with admin.connect() as conn:
            # As when the holder's process dies: Postgres ends its session.
            await conn.execute(
                text(
                    "SELECT pg_terminate_backend(pid) FROM pg_locks "
                    "WHERE locktype = 'advisory' AND granted"
                )
            )
        assert await taker.try_acquire() == 2
        assert not await holder.held()  # it notices, and stops leading
        assert holder.term is None
    finally:
        await holder.release()
        await taker.release()
        await admin.dispose()
