"""Database engine, session factory and the declarative base every table uses."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import DateTime, Dialect, MetaData, event, text
from sqlalchemy.engine import ExceptionContext
from sqlalchemy.exc import DBAPIError, IntegrityError, InterfaceError, OperationalError
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator

# Stable constraint names make migrations reproducible on Postgres and SQLite alike.
NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> datetime:
    """Timezone-aware now, the only clock the models use."""
    return datetime.now(UTC)


def sqlstate(exc: BaseException) -> str | None:
    """The SQLSTATE of a database error (Postgres), from the driver's exception or its cause;
    None when there is none (SQLite, or not a database error)."""
    original = getattr(exc, "orig", None)
    for candidate in (original, getattr(original, "__cause__", None)):
        state = getattr(candidate, "sqlstate", None) or getattr(candidate, "pgcode", None)
        if isinstance(state, str):
            return state
    return None


# SQLSTATE classes of a server that is up but refuses work: connection exception (08),
# insufficient resources such as too_many_connections (53), operator intervention such as
# admin_shutdown or cannot_connect_now (57P), system error (58). asyncpg raises these as plain
# DBAPIErrors, not OperationalError.
_DOWN_SQLSTATES = ("08", "53", "57P", "58")


def is_database_down(exc: BaseException) -> bool:
    """True when `exc` says the database cannot be reached or cannot work right now.

    Not every DBAPIError: a value the database refuses (DataError, e.g. a NUL in text) or a
    constraint is no outage, and reporting it as one hides the bug and invites retries that
    fail the same way. OSError and TimeoutError count: code that reaches the database outside
    an engine made here can still see the driver's own.
    """
    if isinstance(exc, IntegrityError):
        return False  # a constraint said no: the database is up
    if isinstance(exc, OperationalError | InterfaceError | OSError | TimeoutError):
        return True
    if isinstance(exc, DBAPIError):
        if exc.connection_invalidated:
            return True
        state = sqlstate(exc)
        return state is not None and state.startswith(_DOWN_SQLSTATES)
    return False


class UtcDateTime(TypeDecorator[datetime]):
    """A timestamp stored in UTC and always read back timezone-aware.

    Postgres keeps the offset (``timestamptz``); SQLite drops it and hands back naive wall
    times. Without this, the same row would serialise as ``...+00:00`` on one database and as
    a naive (not RFC 3339) timestamp on the other. Naive values written are taken as UTC.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        """Convert to UTC before writing (SQLite would store any offset's wall time)."""
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        """Attach UTC to the naive values SQLite returns."""
        if value is None or value.tzinfo is not None:
            return value
        return value.replace(tzinfo=UTC)


class Base(DeclarativeBase):
    """Declarative base with the naming convention."""

    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class TimestampMixin:
    """created_at / updated_at columns, set by the application clock."""

    created_at: Mapped[datetime] = mapped_column(UtcDateTime(), default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(UtcDateTime(), default=utcnow, onupdate=utcnow)


def new_id() -> uuid.UUID:
    """Primary keys are random UUIDs: ids in URLs reveal nothing about counts."""
    return uuid.uuid4()


def _sqlite_pragmas(dbapi_connection: Any, _: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA busy_timeout=5000")
    cursor.close()


def _connect_or_operational_error(
    dialect: Dialect, _record: Any, cargs: tuple[Any, ...], cparams: dict[str, Any]
) -> Any:
    # asyncpg raises ConnectionRefusedError, socket errors and TimeoutError as they are, and
    # SQLAlchemy wraps only the driver's own exception classes: without this, a stopped
    # server reached every caller as a bare OSError (a 500) instead of an OperationalError.
    try:
        return dialect.connect(*cargs, **cparams)
    except (OSError, TimeoutError) as exc:
        raise OperationalError(None, None, exc) from exc


def _driver_error_as_operational(context: ExceptionContext) -> BaseException | None:
    # The same during a statement (asyncpg's command_timeout is a bare TimeoutError).
    original = context.original_exception
    if context.sqlalchemy_exception is None and isinstance(original, OSError | TimeoutError):
        return OperationalError(context.statement, None, original)
    return None


def create_engine(url: str, *, pool_size: int = 10, echo: bool = False) -> AsyncEngine:
    """Create the async engine for Postgres (asyncpg) or the embedded SQLite (aiosqlite).

    A database that cannot be reached always surfaces as SQLAlchemy's OperationalError, which
    the app's one handler (gateway.errors) answers with 503 and Retry-After.
    """
    if url.startswith("sqlite"):
        engine = create_async_engine(url, echo=echo)
        event.listen(engine.sync_engine, "connect", _sqlite_pragmas)
    else:
        engine = create_async_engine(
            url,
            echo=echo,
            pool_size=pool_size,
            max_overflow=pool_size,
            pool_pre_ping=True,
            # Fail fast when Postgres is down instead of hanging a request.
            connect_args={"timeout": 5, "command_timeout": 30},
        )
    event.listen(engine.sync_engine, "do_connect", _connect_or_operational_error)
    event.listen(engine.sync_engine, "handle_error", _driver_error_as_operational)
    return engine


def create_session_factory(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    """Sessions that keep loaded objects usable after commit."""
    return async_sessionmaker(engine, expire_on_commit=False)


async def ping(engine: AsyncEngine) -> None:
    """Run `SELECT 1`; raises when the database cannot answer."""
    async with engine.connect() as conn:
        await conn.execute(text("SELECT 1"))


async def session_scope(factory: async_sessionmaker[AsyncSession]) -> AsyncIterator[AsyncSession]:
    """Yield a session that is closed afterwards (the request dependency)."""
    async with factory() as session:
        yield session
