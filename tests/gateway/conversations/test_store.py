"""The store under the chat API on real Postgres, without a gateway: the crash sweep's writer
ids, the saved copy of a reply with NUL characters, and which database errors are a 503."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator

import orjson
import pytest
from sqlalchemy import make_url, select, text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from gateway.chat.relay import ReplyRecorder
from gateway.conversations.models import Conversation, Message, MessageStatus
from gateway.conversations.service import (
    INTERRUPTED_NOTE,
    database_errors,
    startup_sweep,
    writer_id,
)
from gateway.db import create_engine, create_session_factory, is_database_down
from gateway.errors import GatewayError
from gateway.proxy.upstream import Outcome
from gateway.users.models import User

pytestmark = pytest.mark.postgres


@contextlib.asynccontextmanager
async def _factory(pg_url: str) -> AsyncIterator[async_sessionmaker[AsyncSession]]:
    engine = create_engine(pg_url, pool_size=1)
    try:
        yield create_session_factory(engine)
    finally:
        await engine.dispose()


async def _conversation(factory: async_sessionmaker[AsyncSession]) -> uuid.UUID:
    async with factory() as session:
        user = User(username=f"u-{uuid.uuid4().hex[:12]}")
        session.add(user)
        await session.flush()
        conversation = Conversation(user_id=user.id, title="t", archived=False)
        session.add(conversation)
        await session.commit()
        return conversation.id


async def _streaming_rows(
    factory: async_sessionmaker[AsyncSession], writers: dict[str, str]
) -> dict[str, uuid.UUID]:
    """One assistant row left `streaming` per writer id, by name."""
    conversation_id = await _conversation(factory)
    ids: dict[str, uuid.UUID] = {}
    async with factory() as session:
        for seq, (name, writer) in enumerate(writers.items()):
            row = Message(
                conversation_id=conversation_id,
                seq=seq,
                role="assistant",
                content=f"partial {name}",
                status=MessageStatus.STREAMING.value,
                writer=writer,
            )
            session.add(row)
            await session.flush()
            ids[name] = row.id
        await session.commit()
    return ids


async def _rows(factory: async_sessionmaker[AsyncSession]) -> dict[uuid.UUID, Message]:
    async with factory() as session:
        return {row.id: row for row in (await session.scalars(select(Message))).all()}


def _dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", ""])
    process.wait()
    return process.pid


async def test_startup_sweep_tells_an_earlier_process_with_this_pid_from_this_one(
    pg_url: str,
) -> None:
    # A gateway restarted as PID 1 (a container) gets the pid of the one killed with -9.
    host, pid = socket.gethostname(), os.getpid()
    writers = {
        "earlier_same_pid": f"{host}:{pid}:{uuid.uuid4().hex}",
        "earlier_same_pid_old_form": f"{host}:{pid}",
        "dead_pid": f"{host}:{_dead_pid()}:{uuid.uuid4().hex}",
        "current": writer_id(),
        "live_other_process": f"{host}:{os.getppid()}:{uuid.uuid4().hex}",
        "other_host": f"elsewhere.example:{pid}:{uuid.uuid4().hex}",
    }
    assert writer_id() == writers["current"]  # made once per process
    async with _factory(pg_url) as factory:
        ids = await _streaming_rows(factory, writers)
        swept = await startup_sweep(factory, stale_after_s=3600)
        rows = await _rows(factory)
    status = {name: rows[row_id].status for name, row_id in ids.items()}
    assert status == {
        "earlier_same_pid": "interrupted",
        "earlier_same_pid_old_form": "interrupted",
        "dead_pid": "interrupted",
        "current": "streaming",
        "live_other_process": "streaming",
        "other_host": "streaming",  # left to staleness
    }
    assert swept == 3
    earlier = rows[ids["earlier_same_pid"]]
    assert earlier.content == "partial earlier_same_pid"  # the text saved so far stays
    assert earlier.error == INTERRUPTED_NOTE
    assert earlier.writer is None
    assert rows[ids["current"]].writer == writers["current"]


def _sse(content: str) -> bytes:
    event = {
        "object": "chat.completion.chunk",
        "choices": [{"index": 0, "delta": {"content": content}}],
    }
    return b"data: " + orjson.dumps(event) + b"\n\ndata: [DONE]\n\n"


@pytest.mark.parametrize("stream", [True, False])
async def test_a_reply_with_nul_characters_is_saved_without_them(pg_url: str, stream: bool) -> None:
    async with _factory(pg_url) as factory:
        ids = await _streaming_rows(factory, {"reply": writer_id()})
        recorder = ReplyRecorder(
            factory=factory,
            conversation_id=(await _rows(factory))[ids["reply"]].conversation_id,
            message_id=ids["reply"],
            stream=stream,
            save_interval_s=3600,
        )
        recorder.delivered({"type": "http.response.start", "status": 200, "headers": []})
        if stream:
            body = _sse("a\u0000b")
        else:
            body = orjson.dumps({"choices": [{"message": {"content": "a\u0000b"}}]})
        recorder.delivered({"type": "http.response.body", "body": body, "more_body": False})
        await recorder.finish(Outcome(status=200, usage={"completion_tokens": 2}), model="m")
        saved = (await _rows(factory))[ids["reply"]]
    assert saved.status == "complete"
    assert saved.content == "ab"
    assert saved.writer is None
    assert saved.completion_tokens == 2


async def test_a_value_the_database_refuses_is_not_reported_as_the_database_down(
    pg_url: str,
) -> None:
    async with _factory(pg_url) as factory, factory() as session:
        with pytest.raises(DBAPIError) as refused:
            async with database_errors():
                await session.execute(text("SELECT CAST(:value AS text)"), {"value": "a\x00b"})
        assert not is_database_down(refused.value)


async def test_a_database_that_cannot_be_reached_is_a_503(pg_url: str) -> None:
    # A port nothing listens on (the one a just-closed socket had).
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = make_url(pg_url).set(host="127.0.0.1", port=port).render_as_string(hide_password=False)
    async with _factory(url) as factory, factory() as session:
        with pytest.raises(GatewayError) as down:
            async with database_errors():
                await session.execute(text("SELECT 1"))
    assert down.value.status_code == 503
    assert down.value.code == "database_unavailable"
