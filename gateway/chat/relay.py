"""The /api/chat relay: the proxy's relay, plus a recorder that saves what the client got.

`ChatRelay` wraps the ASGI `send` of the proxy's `RelayResponse`. Every message that reached
the server is fed to a `ReplyRecorder`, which keeps the text delivered so far (from the
stream's `delta.content`, or the whole body). The final (empty) body message is held back
until the reply is saved, so a client that sees the end of the stream finds the reply in the
conversation. While streaming, the text is written every CHAT_SAVE_INTERVAL_S in the
background, so a gateway killed mid-stream keeps most of it (the crash sweep marks the row).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from sqlalchemy import update
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from starlette.types import Message as AsgiMessage
from starlette.types import Receive, Scope, Send

from gateway.conversations.models import ChatIdempotency, Conversation, Message, MessageStatus
from gateway.db import utcnow
from gateway.logging import get_logger
from gateway.proxy.upstream import Outcome, RelayResponse, SSEDecoder

log = get_logger(__name__)

# Saving a reply is best effort once the client has it: any database error (down, or a value
# it refuses) is logged, and the crash sweep marks a row that stayed `streaming`.
_SAVE_ERRORS = (SQLAlchemyError, OSError, TimeoutError)
# The fields every chunk of a stream shares, kept so that a replay's chunks carry them too.
_CHUNK_ENVELOPE = ("id", "object", "created", "model", "system_fingerprint")


def storable(text: str) -> str:
    """`text` without NUL characters, which Postgres text columns refuse.

    The engine's reply is relayed to the client as sent; only the saved copy loses them, so a
    reply with a NUL is still saved instead of failing as a whole.
    """
    return text.replace("\x00", "") if "\x00" in text else text


def _error_text(data: Any) -> str | None:
    if isinstance(data, dict) and isinstance(data.get("error"), dict):
        return str(data["error"].get("message") or "error")
    if isinstance(data, dict) and isinstance(data.get("detail"), str):
        return str(data["detail"])
    return None


class ReplyRecorder:
    """Keeps the text one client received and writes it to the assistant message."""

    def __init__(
        self,
        *,
        factory: async_sessionmaker[AsyncSession],
        conversation_id: uuid.UUID,
        message_id: uuid.UUID,
        stream: bool,
        save_interval_s: float,
        idempotent: bool = False,
    ) -> None:
        self._factory = factory
        self.conversation_id = conversation_id
        self.message_id = message_id
        self._stream = stream
        self._save_interval_s = save_interval_s
        self._decoder = SSEDecoder()
        self._parts: list[str] = []
        self._saved_parts = 0
        self._last_save = time.monotonic()
        self._flush: asyncio.Task[None] | None = None
        self._finished = False
        self.status_code = 0
        self.error_event: str | None = None
        self.whole_body: bytes | None = None
        # With an Idempotency-Key: what a replay needs to send the same response again.
        self._idempotent = idempotent
        self._envelope: dict[str, Any] | None = None
        self._finish_reason: str | None = None

    @property
    def text(self) -> str:
        """What the client has received so far."""
        return "".join(self._parts)

    def delivered(self, message: AsgiMessage) -> None:
        """One ASGI message reached the server: note what it carried to the client."""
        if message["type"] == "http.response.start":
            self.status_code = int(message["status"])
            return
        body = message.get("body", b"")
        if not body:
            return
        if not self._stream or self.status_code != 200:
            self.whole_body = (self.whole_body or b"") + body
            return
        for data in self._decoder.feed(body):
            self._note_event(data)
        due = time.monotonic() - self._last_save >= self._save_interval_s
        if due and len(self._parts) > self._saved_parts and self._flush is None:
            self._flush = asyncio.ensure_future(self._save_partial())

    def _note_event(self, data: bytes) -> None:
        if data == b"[DONE]":
            return
        try:
            event = orjson.loads(data)
        except orjson.JSONDecodeError:
            return
        error = _error_text(event)
        if error is not None:
            self.error_event = error
            return
        if self._idempotent and self._envelope is None and isinstance(event, dict):
            self._envelope = {name: event[name] for name in _CHUNK_ENVELOPE if name in event}
        for choice in event.get("choices") or ():
            if choice.get("index", 0) != 0:
                continue
            delta = choice.get("delta") or {}
            content = delta.get("content")
            if isinstance(content, str):
                self._parts.append(content)
            if choice.get("finish_reason") is not None:
                self._finish_reason = choice["finish_reason"]

    async def _save_partial(self) -> None:
        parts = len(self._parts)
        try:
            async with self._factory() as session:
                await session.execute(
                    update(Message)
                    .where(
                        Message.id == self.message_id,
                        Message.status == MessageStatus.STREAMING.value,
                    )
                    .values(content=storable("".join(self._parts[:parts])), updated_at=utcnow())
                )
                await session.commit()
            self._saved_parts = parts
        except _SAVE_ERRORS as exc:
            log.warning("chat_partial_not_saved", error=type(exc).__name__)
        finally:
            self._last_save = time.monotonic()
            self._flush = None

    def _final_state(self, outcome: Outcome) -> tuple[str, str, str | None]:
        """(status, content, error) of the reply."""
        if not self._stream or self.status_code != 200:
            return self._final_whole(outcome)
        text = self.text
        if outcome.disconnected:
            return MessageStatus.INCOMPLETE.value, text, "The client closed the connection."
        error = self.error_event or outcome.error
        if error is None and outcome.status == 200:
            return MessageStatus.COMPLETE.value, text, None
        status = MessageStatus.INCOMPLETE if text else MessageStatus.ERROR
        return status.value, text, error or "The reply did not finish."

    def _final_whole(self, outcome: Outcome) -> tuple[str, str, str | None]:
        body = self.whole_body or b""
        try:
            parsed: Any = orjson.loads(body) if body else None
        except orjson.JSONDecodeError:
            parsed = None
        if outcome.status == 200 and isinstance(parsed, dict):
            choices = parsed.get("choices") or [{}]
            content = (choices[0].get("message") or {}).get("content") or ""
            return MessageStatus.COMPLETE.value, str(content), None
        if outcome.disconnected:
            return MessageStatus.INCOMPLETE.value, "", "The client closed the connection."
        error = _error_text(parsed) or outcome.error or f"status {outcome.status}"
        return MessageStatus.ERROR.value, "", error

    def _replayable(self, status: str) -> str | None:
        """What a retry with the same Idempotency-Key sends again (gateway.chat.replay): a
        whole reply's JSON body exactly as the client got it; for a stream, the fields its
        chunks shared and its finish_reason (the text is the message's content)."""
        if not self._idempotent:
            return None
        if not self._stream or self.status_code != 200:
            if status != MessageStatus.COMPLETE.value or self.whole_body is None:
                return None
            try:
                text = self.whole_body.decode()
            except UnicodeDecodeError:
                return None
        elif self._envelope is not None:
            text = orjson.dumps({**self._envelope, "finish_reason": self._finish_reason}).decode()
        else:
            return None
        # A raw NUL is no JSON, and a text column refuses it: the replay is then rebuilt.
        return None if "\x00" in text else text

    async def finish(self, outcome: Outcome, *, model: str | None) -> None:
        """Write the reply as the client got it: content, status, error and usage."""
        if self._finished:
            return
        self._finished = True
        if self._flush is not None:
            await asyncio.gather(self._flush, return_exceptions=True)
        status, content, error = self._final_state(outcome)
        usage = outcome.usage or {}
        values: dict[str, Any] = {
            "content": storable(content),
            "status": status,
            "error": storable(error)[:500] if error else None,
            "writer": None,
            "updated_at": utcnow(),
            "prompt_tokens": usage.get("prompt_tokens"),
            "completion_tokens": usage.get("completion_tokens"),
        }
        if model:
            values["model"] = model
        try:
            async with self._factory() as session:
                await session.execute(
                    update(Message).where(Message.id == self.message_id).values(**values)
                )
                replayable = self._replayable(status)
                if replayable is not None:
                    await session.execute(
                        update(ChatIdempotency)
                        .where(ChatIdempotency.assistant_message_id == self.message_id)
                        .values(response=replayable)
                    )
                await session.execute(
                    update(Conversation)
                    .where(Conversation.id == self.conversation_id)
                    .values(updated_at=utcnow())
                )
                await session.commit()
        except _SAVE_ERRORS as exc:
            # The crash sweep will mark the row; the text written so far stays.
            log.error(
                "chat_reply_not_saved",
                message_id=str(self.message_id),
                error=type(exc).__name__,
            )
            return
        log.info(
            "chat_reply_saved",
            message_id=str(self.message_id),
            status=status,
            chars=len(content),
        )


class ChatRelay(RelayResponse):
    """The proxy relay with a recorder on its `send`."""

    def __init__(
        self,
        *,
        recorder: ReplyRecorder,
        model_of_target: Callable[[], str | None],
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self._recorder = recorder
        self._model_of_target = model_of_target

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Relay, then save the reply, then let the response end."""
        held: list[AsgiMessage] = []
        recorder = self._recorder

        async def tapped(message: AsgiMessage) -> None:
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                held.append(message)
                recorder.delivered(message)
                return
            await send(message)
            recorder.delivered(message)

        try:
            await super().__call__(scope, receive, tapped)
        finally:
            await _shielded(recorder.finish(self.outcome, model=self._model_of_target()))
        for message in held:
            await send(message)


async def _shielded(work: Awaitable[None]) -> None:
    # A cancelled request (server shutdown) must still save what the client received.
    await asyncio.shield(asyncio.ensure_future(work))
