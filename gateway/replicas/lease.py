"""The fleet's leader lease: a PostgreSQL session-level advisory lock, with a fencing term.

The replica whose database session holds `pg_try_advisory_lock(LOCK_KEY)` leads; the lock is
released by Postgres the moment that session ends (the process died, its connection dropped),
so another replica takes it at its next try. Taking it increments the `fleet_leader` row's
`term` (and records the holder's URL, where followers send fleet operations): the term fences
a deposed leader out of the engines (see orchestrator/runtimes/ray.py). An existing primitive,
not a consensus protocol: Postgres is the one authority, as it is for every other write.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass

from sqlalchemy import text
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine
from sqlalchemy.pool import NullPool

from gateway.logging import get_logger

log = get_logger(__name__)

# pg advisory lock key: "vcgfleet" as a signed 64-bit integer.
LOCK_KEY = int.from_bytes(b"vcgfleet", "big", signed=True)
_QUERY_TIMEOUT_S = 3.0

_TAKE_TERM = """
INSERT INTO fleet_leader (id, term, holder, url, since) VALUES (1, 1, :holder, :url, now())
ON CONFLICT (id) DO UPDATE
SET term = fleet_leader.term + 1, holder = EXCLUDED.holder, url = EXCLUDED.url,
    since = EXCLUDED.since
RETURNING term
"""


@dataclass(frozen=True)
class LeaderInfo:
    """Who leads: its name, the URL followers reach it at, its term."""

    holder: str
    url: str
    term: int


_ERRORS = (OSError, asyncio.TimeoutError, SQLAlchemyError)


class LeaderLease:
    """This replica's side of the lease: one dedicated database session."""

    def __init__(self, database_url: str, *, holder: str, url: str) -> None:
        # Its own engine without a pool: the session that holds the lock is never shared.
        self._engine: AsyncEngine = create_async_engine(database_url, poolclass=NullPool)
        self.holder = holder
        self.url = url
        self.term: int | None = None
        self._session: AsyncConnection | None = None

    async def _connection(self) -> AsyncConnection:
        if self._session is None or self._session.closed:
            self._session = await asyncio.wait_for(self._engine.connect(), _QUERY_TIMEOUT_S)
        return self._session

    async def _value(self, query: str, **params: object) -> object:
        session = await self._connection()
        result = await asyncio.wait_for(session.execute(text(query), params), _QUERY_TIMEOUT_S)
        value = result.scalar()
        await session.commit()
        return value

    async def try_acquire(self) -> int | None:
        """Take the lease if nobody holds it: the new term, or None."""
        try:
            if not await self._value("SELECT pg_try_advisory_lock(:key)", key=LOCK_KEY):
                return None
            term = int(str(await self._value(_TAKE_TERM, holder=self.holder, url=self.url)))
        except _ERRORS as exc:
            log.warning("fleet_lease_unavailable", reason=str(exc))
            await self._drop()
            return None
        self.term = term
        log.info("fleet_lease_taken", holder=self.holder, term=term)
        return term

    async def held(self) -> bool:
        """Whether this replica still holds the lease (its session is alive)."""
        if self.term is None or self._session is None or self._session.closed:
            return False
        try:
            await self._value("SELECT 1")
        except _ERRORS as exc:
            log.error("fleet_lease_lost", holder=self.holder, term=self.term, reason=str(exc))
            self.term = None
            await self._drop()
            return False
        return True

    async def leader(self) -> LeaderInfo | None:
        """Who leads now, as the fleet_leader row says (None before anyone led)."""
        async with self._engine.connect() as session:
            result = await asyncio.wait_for(
                session.execute(text("SELECT holder, url, term FROM fleet_leader WHERE id = 1")),
                _QUERY_TIMEOUT_S,
            )
            row = result.first()
        if row is None:
            return None
        return LeaderInfo(holder=str(row.holder), url=str(row.url), term=int(row.term))

    async def _drop(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            with contextlib.suppress(Exception):
                await session.close()

    async def release(self) -> None:
        """End the session (the lock is free for the next replica) and the engine."""
        self.term = None
        await self._drop()
        await self._engine.dispose()
