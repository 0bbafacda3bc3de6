"""Conversations: ownership, keyset pagination, export/import and the crash sweep.

Every lookup is scoped to the caller: another user's conversation is "not found" (404), never
"forbidden", so ids reveal nothing. Admins may read (never change) any conversation only when
ADMIN_CAN_READ_CONVERSATIONS is on; each such read is logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import socket
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import delete, func, select, update
from sqlalchemy.exc import DBAPIError, SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from gateway.conversations.models import Conversation, Message, MessageStatus
from gateway.db import is_database_down, utcnow
from gateway.errors import GatewayError, database_unavailable
from gateway.logging import get_logger
from gateway.principal import Principal

log = get_logger(__name__)

TITLE_CHARS = 60
MAX_PAGE = 200

# -- writer ids --------------------------------------------------------------------------------

# Made once per process: a restarted gateway can get the pid of the one that died (PID 1 in a
# container, a recycled pid), so host:pid alone would make the dead writer look alive.
_NONCE_BY_PID: dict[int, str] = {}


def writer_id() -> str:
    """`host:pid:nonce` naming this process as the writer of a streaming reply.

    The nonce is a uuid4 made the first time a process asks (again after a fork, whose child
    has its own pid), so the crash sweep tells this process from an earlier one with its pid.
    """
    pid = os.getpid()
    nonce = _NONCE_BY_PID.get(pid)
    if nonce is None:
        nonce = _NONCE_BY_PID.setdefault(pid, uuid.uuid4().hex)
    return f"{socket.gethostname()}:{pid}:{nonce}"


@contextlib.asynccontextmanager
async def database_errors() -> AsyncIterator[None]:
    """Turn a database that cannot be reached into the 503 GatewayError here, for code that
    must hold it as one (to answer inside a stream, or around other work). Routes need
    nothing: the app's one handler (gateway.errors) answers them the same way.

    Other database errors (a constraint, a refused value) pass through unchanged.
    """
    try:
        yield
    except (DBAPIError, OSError, TimeoutError) as exc:
        if not is_database_down(exc):
            raise
        log.warning("database_unavailable", error=type(exc).__name__)
        raise database_unavailable() from exc


def require_user(principal: Principal) -> uuid.UUID:
    """Conversations belong to a user: the anonymous caller and the admin key have none."""
    if principal.user_id is None:
        raise GatewayError(
            401,
            "Conversations need a signed-in user or an API key of one.",
            code="user_required",
            headers={"WWW-Authenticate": "Bearer"},
        )
    return principal.user_id


def make_title(text: str) -> str:
    """A title from the first message: whitespace collapsed, cut at a word near 60 chars."""
    words = " ".join(text.split())
    if not words:
        return "New conversation"
    if len(words) <= TITLE_CHARS:
        return words
    cut = words[:TITLE_CHARS].rsplit(" ", 1)[0] or words[:TITLE_CHARS]
    return cut.rstrip(" ,.;:") + "…"


# -- ownership ---------------------------------------------------------------------------------


def _not_found(conversation_id: uuid.UUID) -> GatewayError:
    return GatewayError(
        404, f"Conversation {conversation_id} was not found.", code="conversation_not_found"
    )


async def get_owned(
    session: AsyncSession,
    *,
    principal: Principal,
    conversation_id: uuid.UUID,
    admin_may_read: bool = False,
    lock: bool = False,
) -> Conversation:
    """The caller's conversation (or, for an admin allowed to read for support, anyone's)."""
    user_id = require_user(principal)
    query = select(Conversation).where(Conversation.id == conversation_id)
    if lock:
        query = query.with_for_update()
    found = (await session.execute(query)).scalar_one_or_none()
    if found is None:
        raise _not_found(conversation_id)
    if found.user_id != user_id:
        if not (admin_may_read and principal.is_admin):
            raise _not_found(conversation_id)
        log.info(
            "conversation_read_by_admin",
            conversation_id=str(conversation_id),
            owner_id=str(found.user_id),
        )
    return found


# -- cursors -----------------------------------------------------------------------------------
# A cursor is the position of the last row of a page, written in the clear so that the OpenAPI
# document can state its exact shape: any string of that shape is a position (a page after it,
# perhaps empty), and anything else is refused by the router before it gets here.

# Conversations: updated_at in microseconds since the Unix epoch, a dot, the id in hex.
CONVERSATION_CURSOR_PATTERN = r"^[0-9]{1,17}\.[0-9a-f]{32}$"
# Messages: the seq of the last message (an INTEGER column).
MESSAGE_CURSOR_PATTERN = r"^[0-9]{1,9}$"
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND = timedelta(microseconds=1)


def _not_a_cursor() -> GatewayError:
    return GatewayError(400, "'cursor' is not a cursor this API returned.", param="cursor")


def _conversation_cursor(updated_at: datetime, conversation_id: uuid.UUID) -> str:
    return f"{(updated_at - _EPOCH) // _MICROSECOND}.{conversation_id.hex}"


def _read_conversation_cursor(cursor: str) -> tuple[datetime, uuid.UUID]:
    if re.fullmatch(CONVERSATION_CURSOR_PATTERN, cursor) is None:
        raise _not_a_cursor()
    micros, hex_id = cursor.split(".")
    return _EPOCH + int(micros) * _MICROSECOND, uuid.UUID(hex=hex_id)


def _read_message_cursor(cursor: str) -> int:
    if re.fullmatch(MESSAGE_CURSOR_PATTERN, cursor) is None:
        raise _not_a_cursor()
    return int(cursor)


@dataclass(frozen=True)
class Page:
    """One page of conversations and the cursor of the next (None at the end)."""

    items: Sequence[Conversation]
    next_cursor: str | None


async def list_conversations(
    session: AsyncSession,
    *,
    user_id: uuid.UUID,
    limit: int,
    cursor: str | None,
    query: str | None,
    archived: bool,
) -> Page:
    """The user's conversations, most recently updated first (keyset: stable under inserts)."""
    stmt = select(Conversation).where(
        Conversation.user_id == user_id, Conversation.archived.is_(archived)
    )
    if query:
        stmt = stmt.where(func.lower(Conversation.title).contains(query.lower(), autoescape=True))
    if cursor:
        updated_at, last_id = _read_conversation_cursor(cursor)
        stmt = stmt.where(
            (Conversation.updated_at < updated_at)
            | ((Conversation.updated_at == updated_at) & (Conversation.id < last_id))
        )
    stmt = stmt.order_by(Conversation.updated_at.desc(), Conversation.id.desc()).limit(limit + 1)
    rows = list((await session.execute(stmt)).scalars())
    next_cursor = None
    if len(rows) > limit:
        rows = rows[:limit]
        last = rows[-1]
        next_cursor = _conversation_cursor(last.updated_at, last.id)
    return Page(rows, next_cursor)


@dataclass(frozen=True)
class MessagePage:
    """Messages in order and the cursor of the next page (None at the end)."""

    items: Sequence[Message]
    next_cursor: str | None


async def messages_page(
    session: AsyncSession, *, conversation_id: uuid.UUID, limit: int, cursor: str | None
) -> MessagePage:
    """A conversation's messages, oldest first, from after the cursor."""
    after = -1 if not cursor else _read_message_cursor(cursor)
    stmt = (
        select(Message)
        .where(Message.conversation_id == conversation_id, Message.seq > after)
        .order_by(Message.seq)
        .limit(limit + 1)
    )
    rows = list((await session.execute(stmt)).scalars())
    next_cursor = None
    if len(rows) > limit:
        rows = rows[:limit]
        next_cursor = str(rows[-1].seq)
    return MessagePage(rows, next_cursor)


async def all_messages(session: AsyncSession, *, conversation_id: uuid.UUID) -> list[Message]:
    """Every message of a conversation in order."""
    stmt = select(Message).where(Message.conversation_id == conversation_id).order_by(Message.seq)
    return list((await session.execute(stmt)).scalars())


# -- changes -----------------------------------------------------------------------------------


async def create_conversation(
    session: AsyncSession, *, user_id: uuid.UUID, title: str | None, model: str | None
) -> Conversation:
    """A new, empty conversation (committed)."""
    conversation = Conversation(
        user_id=user_id, title=make_title(title or ""), model=model, archived=False
    )
    session.add(conversation)
    await session.commit()
    return conversation


async def update_conversation(
    session: AsyncSession,
    *,
    conversation: Conversation,
    title: str | None,
    archived: bool | None,
) -> Conversation:
    """Rename and/or (un)archive (committed)."""
    if title is not None:
        conversation.title = " ".join(title.split())[:200] or "New conversation"
    if archived is not None:
        conversation.archived = archived
    await session.commit()
    return conversation


async def delete_conversation(session: AsyncSession, *, conversation: Conversation) -> None:
    """Delete a conversation with its messages (committed)."""
    await session.execute(delete(Message).where(Message.conversation_id == conversation.id))
    await session.delete(conversation)
    await session.commit()


async def next_seq(session: AsyncSession, conversation_id: uuid.UUID) -> int:
    """The next position in a conversation (call under the conversation's row lock)."""
    stmt = select(func.max(Message.seq)).where(Message.conversation_id == conversation_id)
    current = (await session.execute(stmt)).scalar_one_or_none()
    return 0 if current is None else int(current) + 1


# -- export / import ---------------------------------------------------------------------------

EXPORT_VERSION = 1


def export_json(conversation: Conversation, messages: Sequence[Message]) -> dict[str, Any]:
    """A conversation as a self-contained JSON document (importable again)."""
    return {
        "version": EXPORT_VERSION,
        "conversation": {
            "id": str(conversation.id),
            "title": conversation.title,
            "model": conversation.model,
            "archived": conversation.archived,
            "created_at": conversation.created_at.isoformat(),
            "updated_at": conversation.updated_at.isoformat(),
        },
        "messages": [
            {
                "role": message.role,
                "content": message.content,
                "model": message.model,
                "status": message.status,
                "error": message.error,
                "prompt_tokens": message.prompt_tokens,
                "completion_tokens": message.completion_tokens,
                "created_at": message.created_at.isoformat(),
            }
            for message in messages
        ],
    }


def export_markdown(conversation: Conversation, messages: Sequence[Message]) -> str:
    """A conversation as Markdown: a heading per message, the text as it was written."""
    lines = [f"# {conversation.title}", ""]
    if conversation.model:
        lines += [f"Model: {conversation.model}", ""]
    for message in messages:
        heading = message.role.capitalize()
        if message.role == "assistant" and message.model:
            heading += f" ({message.model})"
        if message.status != MessageStatus.COMPLETE.value:
            heading += f" [{message.status}]"
        lines += [f"## {heading}", "", message.content, ""]
    return "\n".join(lines)


@dataclass(frozen=True)
class ImportedMessage:
    """One message of an imported document."""

    role: str
    content: str
    model: str | None
    status: str
    prompt_tokens: int | None
    completion_tokens: int | None


async def import_conversation(
    session: AsyncSession,
    *,
    user_id: uuid.UUID,
    title: str,
    model: str | None,
    archived: bool,
    messages: Sequence[ImportedMessage],
) -> Conversation:
    """A new conversation of the caller holding the given messages in order (committed)."""
    conversation = Conversation(
        user_id=user_id, title=make_title(title), model=model, archived=archived
    )
    session.add(conversation)
    await session.flush()
    for seq, item in enumerate(messages):
        status = item.status
        if status == MessageStatus.STREAMING.value:
            status = MessageStatus.INTERRUPTED.value  # nothing is writing it here
        session.add(
            Message(
                conversation_id=conversation.id,
                seq=seq,
                role=item.role,
                content=item.content,
                model=item.model,
                status=status,
                prompt_tokens=item.prompt_tokens,
                completion_tokens=item.completion_tokens,
            )
        )
    await session.commit()
    return conversation


# -- crash sweep -------------------------------------------------------------------------------

INTERRUPTED_NOTE = "The gateway stopped while this reply was being written."


def _parse_writer(writer: str) -> tuple[str, int, str | None] | None:
    """(host, pid, nonce) of `host:pid:nonce`, or (host, pid, None) of an older `host:pid`."""
    # Host names hold no ':', so the number of parts tells the two forms apart.
    parts = writer.split(":")
    if len(parts) == 3 and parts[0] and parts[1].isdigit() and parts[2]:
        return parts[0], int(parts[1]), parts[2]
    if len(parts) == 2 and parts[0] and parts[1].isdigit():
        return parts[0], int(parts[1]), None
    return None


def _writer_is_gone(writer: str | None, host: str) -> bool:
    """True when `writer` names a process of this host that no longer runs."""
    if not writer or ":" not in writer:
        return True
    parsed = _parse_writer(writer)
    if parsed is None:
        return False  # an id this code cannot read: only staleness can tell
    writer_host, pid, _ = parsed
    if writer_host != host:
        return False  # another host's process: only staleness can tell
    if pid == os.getpid():
        # Our pid but not our id: an earlier process that had this pid (a restart as PID 1).
        # This process writes only `host:pid:nonce`, so an id without a nonce is not ours.
        return writer != writer_id()
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False  # alive, another user's
    return False


async def sweep_interrupted(
    factory: async_sessionmaker[AsyncSession], *, stale_after_s: float
) -> int:
    """Mark replies left `streaming` by a process that died as `interrupted`.

    A row is swept when its writer was a process of this host that no longer runs (kill -9,
    then a restart; a process with this process's pid but another nonce is an earlier one),
    or when nothing has written it for `stale_after_s` (another host's writer that died).
    The text saved so far stays. Returns how many rows were marked.
    """
    host = socket.gethostname()
    stale_before = utcnow() - timedelta(seconds=stale_after_s)
    async with factory() as session:
        rows = (
            await session.execute(
                select(Message.id, Message.writer, Message.updated_at).where(
                    Message.status == MessageStatus.STREAMING.value
                )
            )
        ).all()
        gone = [
            row.id
            for row in rows
            if _writer_is_gone(row.writer, host) or _aware(row.updated_at) < stale_before
        ]
        if not gone:
            return 0
        await session.execute(
            update(Message)
            .where(Message.id.in_(gone), Message.status == MessageStatus.STREAMING.value)
            .values(status=MessageStatus.INTERRUPTED.value, error=INTERRUPTED_NOTE, writer=None)
        )
        await session.commit()
    log.warning("chat_replies_interrupted", count=len(gone))
    return len(gone)


def _aware(value: datetime) -> datetime:
    # SQLite returns naive datetimes for timezone-aware columns; they were written in UTC.
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


async def startup_sweep(
    factory: async_sessionmaker[AsyncSession], *, stale_after_s: float
) -> int | None:
    """The sweep at startup; a database that is down or not migrated only delays it."""
    try:
        return await sweep_interrupted(factory, stale_after_s=stale_after_s)
    except (SQLAlchemyError, OSError, TimeoutError) as exc:
        # The class name only: a database error's text can carry statement parameters.
        log.warning("chat_sweep_skipped", error=type(exc).__name__)
        return None


async def sweep_forever(
    factory: async_sessionmaker[AsyncSession], *, stale_after_s: float, interval_s: float
) -> None:
    """Run `sweep_interrupted` every `interval_s` (for writers on other hosts that died)."""
    while True:
        await asyncio.sleep(interval_s)
        try:
            await sweep_interrupted(factory, stale_after_s=stale_after_s)
        except (SQLAlchemyError, OSError, TimeoutError) as exc:
            log.warning("chat_sweep_failed", error=type(exc).__name__)
