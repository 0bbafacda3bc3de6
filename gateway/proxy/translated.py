"""Anthropic's Messages API on an engine that only speaks OpenAI chat completions.

An engine whose profile does not list the `messages` API (a command or external engine by
default) gets /v1/messages as a chat completion; its answer, whole or streamed, goes back as
Anthropic's message or events (gateway/proxy/messages_chat.py holds the translation itself).
"""

from __future__ import annotations

from typing import Any

import aiohttp
import orjson
from starlette.types import Receive, Scope, Send

from gateway.errors import anthropic_error_body
from gateway.proxy.messages_chat import (
    ChatStreamToMessages,
    chat_body_from_messages,
    message_from_chat,
)
from gateway.proxy.upstream import (
    SSE_DONE,
    RelayResponse,
    SSEDecoder,
    StreamConsumer,
    named_event,
    upstream_url,
)
from gateway.proxy.validation import Route


def _stop_sequences(body: dict[str, Any]) -> tuple[str, ...]:
    stops = body.get("stop_sequences")
    return tuple(stops) if isinstance(stops, list) else ()


class TranslatingConsumer(StreamConsumer):
    """Reads a chat completion stream; relays it as Anthropic's events."""

    __slots__ = ("_decoder", "_translator")

    def __init__(self, translator: ChatStreamToMessages) -> None:
        super().__init__()
        self._decoder = SSEDecoder()
        self._translator = translator

    def feed(self, chunk: bytes) -> bytes:
        out: list[bytes] = []
        for data in self._decoder.feed(chunk):
            self.seen += 1
            if data == SSE_DONE:
                self.finished = True
                continue
            parsed = orjson.loads(data)
            if not isinstance(parsed, dict):
                continue
            if isinstance(parsed.get("error"), dict):
                self.error = "upstream sent an error event"
                continue
            out.extend(_events(self._translator.feed(parsed)))
        self.deltas = self._translator.deltas
        self.usage = self._translator.usage
        return b"".join(out)

    def close(self) -> bytes:
        closing = b"".join(_events(self._translator.finish()))
        self.usage = self._translator.usage
        return closing


def _events(events: list[tuple[str, dict[str, Any]]]) -> list[bytes]:
    return [named_event(name.encode(), orjson.dumps(data)) for name, data in events]


class TranslatedMessagesRelay(RelayResponse):
    """POST /v1/messages relayed to the engine's /v1/chat/completions."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        body = self._request.body
        self._client_model = self._request.model or self._target.model
        self._stops = _stop_sequences(body)
        self._refusal: str | None = None
        self._chat_body = b""
        try:
            chat = chat_body_from_messages(body, model=self._target.model)
        except ValueError as exc:
            self._refusal = str(exc)
        else:
            self._chat_body = orjson.dumps(chat)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Refuse what cannot be translated (400), else relay as any request."""
        if self._refusal is None:
            await super().__call__(scope, receive, send)
            return
        self.outcome.status, self.outcome.error = 400, self._refusal
        try:
            body = orjson.dumps(anthropic_error_body(self._refusal, status_code=400))
            headers = [
                (b"content-type", b"application/json"),
                (b"content-length", b"%d" % len(body)),
                (b"x-error-source", b"gateway"),
            ]
            await send({"type": "http.response.start", "status": 400, "headers": headers})
            await send({"type": "http.response.body", "body": body})
        finally:
            self._on_finish(self.outcome)

    def _upstream(self) -> tuple[str, bytes | aiohttp.FormData]:
        return upstream_url(self._target.api_base, Route.CHAT), self._chat_body

    def _whole_answer(self, status: int, content: bytes) -> bytes:
        try:
            parsed = orjson.loads(content)
        except orjson.JSONDecodeError:
            parsed = None
        if status == 200 and isinstance(parsed, dict):
            message = message_from_chat(
                parsed, model=self._client_model, stop_sequences=self._stops
            )
            return orjson.dumps(message)
        # The engine's error, in Anthropic's envelope with the engine's message.
        error = parsed.get("error") if isinstance(parsed, dict) else None
        detail = error.get("message") if isinstance(error, dict) else None
        text = detail if isinstance(detail, str) else content[:500].decode(errors="replace")
        return orjson.dumps(anthropic_error_body(text, status_code=status))

    def _consumer(self) -> StreamConsumer:
        return TranslatingConsumer(
            ChatStreamToMessages(model=self._client_model, stop_sequences=self._stops)
        )
