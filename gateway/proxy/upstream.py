"""Relay one request to an upstream (local engine or cloud) and the answer back to the client.

The relay is a raw ASGI response: it watches `receive()` for the client going away while it
waits on the upstream, so a disconnect cancels the upstream request at once (Starlette's
StreamingResponse would only notice on its next send), for streams and whole responses alike.

Upstream calls go through one shared aiohttp session (`create_relay_session`): under load its
connection pool costs a fraction of httpx's (encode/httpx#3215). Streams are split into
server-sent events here, and every complete event of one network read goes to the client in
one ASGI message.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from gateway.errors import anthropic_error_body, error_body
from gateway.proxy.validation import (
    ANTHROPIC_ROUTES,
    NAMED_EVENT_ROUTES,
    UPSTREAM_PATHS,
    ProxyRequest,
    Route,
)

# Routes whose streams carry usage only when asked (`stream_options.include_usage`).
_USAGE_OPTION_ROUTES = frozenset({Route.CHAT, Route.COMPLETIONS})
SSE_DONE = b"[DONE]"
# Bodies are relayed as they come (the session does not decompress), so ask for them plain.
_REQUEST_HEADERS = {"content-type": "application/json", "accept-encoding": "identity"}
# aiohttp must clean up closed TLS transports itself before these versions (cpython#118960);
# from them on the option is ignored with a DeprecationWarning.
_NEEDS_CLEANUP_CLOSED = sys.version_info < (3, 12, 8) or (3, 13, 0) <= sys.version_info < (3, 13, 1)


def create_relay_session(
    *, connect_timeout_s: float, read_timeout_s: float, max_connections: int = 512
) -> aiohttp.ClientSession:
    """The one upstream session of an app (open it in the lifespan, inside the event loop).

    Every relayed request sets its own timeouts; the session's apply to nothing else.
    trust_env=False: a proxy variable in the environment must not redirect engine traffic.
    """
    connector = aiohttp.TCPConnector(
        limit=max_connections,
        limit_per_host=0,
        keepalive_timeout=60,
        enable_cleanup_closed=_NEEDS_CLEANUP_CLOSED,
    )
    return aiohttp.ClientSession(
        connector=connector,
        timeout=aiohttp.ClientTimeout(total=read_timeout_s, connect=connect_timeout_s),
        auto_decompress=False,
        trust_env=False,
    )


@dataclass(frozen=True)
class Target:
    """Where one request goes: an OpenAI base URL (ending in /v1), the model name it knows."""

    route_name: str  # "local" or "cloud"
    api_base: str
    model: str
    headers: dict[str, str] = field(default_factory=dict)
    # The local engine's profile (None for the cloud).
    profile_id: str | None = None


@dataclass
class Outcome:
    """What happened to one relayed request (for limits, usage and metrics)."""

    status: int = 0
    usage: dict[str, Any] | None = None
    error: str | None = None
    disconnected: bool = False
    first_byte_s: float | None = None
    started: float = field(default_factory=time.perf_counter)


def upstream_url(api_base: str, route: Route) -> str:
    """The route's URL on an upstream whose OpenAI base URL (ending in /v1) is `api_base`:
    vLLM serves /tokenize and /detokenize at its root, the rest under /v1."""
    base = api_base.rstrip("/")
    path = UPSTREAM_PATHS[route]
    if path.startswith("/v1/"):
        return base + path[3:]
    return base.removesuffix("/v1") + path


def normalized_usage(usage: Any) -> dict[str, Any] | None:
    """An engine's usage in the gateway's terms (prompt, completion and total tokens): the
    Responses API's and Anthropic's input/output tokens are counted as prompt/completion
    (Anthropic's cache reads and writes are input too). None when it is not an object."""
    if not isinstance(usage, dict):
        return None
    if "prompt_tokens" in usage or ("input_tokens" not in usage and "output_tokens" not in usage):
        return usage
    prompt = sum(
        _count(usage.get(name))
        for name in ("input_tokens", "cache_creation_input_tokens", "cache_read_input_tokens")
    )
    completion = _count(usage.get("output_tokens"))
    total = _count(usage.get("total_tokens")) or prompt + completion
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": total}


def _count(value: Any) -> int:
    return value if type(value) is int and value > 0 else 0


def upstream_body(request: ProxyRequest, target: Target) -> bytes:
    """The client's body with the upstream's model name, asking a stream for its usage."""
    body = dict(request.body)
    body["model"] = target.model
    if request.stream and request.route in _USAGE_OPTION_ROUTES:
        options = dict(body.get("stream_options") or {})
        options["include_usage"] = True
        body["stream_options"] = options
    return orjson.dumps(body)


class SSEDecoder:
    """Splits a server-sent event stream, fed in arbitrary chunks, into the data of its events.

    Events end at a blank line (LF or CRLF line ends); an event's `data:` lines are joined
    with LF, its other fields and comments are dropped, and an event without data is skipped.
    An unterminated event at the end of the stream is never returned.
    """

    __slots__ = ("_pending",)

    def __init__(self) -> None:
        self._pending = b""

    def feed(self, chunk: bytes) -> list[bytes]:
        """The data of every event that `chunk` completes, in order."""
        buffer = self._pending + chunk if self._pending else chunk
        if b"\r" in buffer:
            # The whole pending buffer: a CRLF may straddle two chunks.
            buffer = buffer.replace(b"\r\n", b"\n")
        *events, self._pending = buffer.split(b"\n\n")
        found: list[bytes] = []
        for event in events:
            if event.startswith(b"data: ") and b"\n" not in event:
                found.append(event[6:])  # what OpenAI-compatible servers send
            elif (data := _event_data(event)) is not None:
                found.append(data)
        return found


class NamedSSEDecoder:
    """Splits a server-sent event stream into (event name, data) pairs, for the streams whose
    events are named (the Responses API's and Anthropic's); the name is None when an event has
    none. Comments and events without data are dropped, as by SSEDecoder."""

    __slots__ = ("_pending",)

    def __init__(self) -> None:
        self._pending = b""

    def feed(self, chunk: bytes) -> list[tuple[bytes | None, bytes]]:
        """The events that `chunk` completes, in order."""
        buffer = self._pending + chunk if self._pending else chunk
        if b"\r" in buffer:
            buffer = buffer.replace(b"\r\n", b"\n")
        *events, self._pending = buffer.split(b"\n\n")
        found: list[tuple[bytes | None, bytes]] = []
        for event in events:
            data = _event_data(event)
            if data is None:
                continue
            name = None
            for line in event.split(b"\n"):
                if line.startswith(b"event:"):
                    name = line[6:].strip()
            found.append((name, data))
        return found


def named_event(name: bytes | None, data: bytes) -> bytes:
    """One server-sent event with its name (a multi-line data as several `data:` lines)."""
    if b"\n" in data:
        data = data.replace(b"\n", b"\ndata: ")
    if name is None:
        return b"data: " + data + b"\n\n"
    return b"event: " + name + b"\ndata: " + data + b"\n\n"


def stream_error_event(route: Route, message: str, *, code: str, error_type: str) -> bytes:
    """The error event that ends a stream after its 200, in the route's own shape: Anthropic's
    `error` event on /v1/messages, the Responses API's `error` event on /v1/responses, the
    error envelope as data elsewhere (what OpenAI-compatible servers send)."""
    if route in ANTHROPIC_ROUTES:
        status = 504 if error_type == "timeout_error" else 503
        return named_event(
            b"error", orjson.dumps(anthropic_error_body(message, status_code=status))
        )
    if route is Route.RESPONSES:
        data = {"type": "error", "code": code, "message": message, "param": None}
        return named_event(b"error", orjson.dumps(data))
    return _sse(_error_bytes(message, error_type=error_type, code=code))


def error_answer(route: Route, status: int, message: str, *, code: str, error_type: str) -> bytes:
    """A whole error answer's body in the route's envelope (Anthropic's on its routes)."""
    if route in ANTHROPIC_ROUTES:
        return orjson.dumps(anthropic_error_body(message, status_code=status))
    return _error_bytes(message, error_type=error_type, code=code)


class EventReader:
    """What the relay learns from a named-event stream: whether it finished, its usage, an
    error event, and the count of its text deltas (the fallback token count)."""

    __slots__ = ("_raw_usage", "deltas", "error", "finished", "usage")

    def __init__(self) -> None:
        self._raw_usage: dict[str, Any] | None = None
        self.finished = False
        self.usage: dict[str, Any] | None = None
        self.error: str | None = None
        self.deltas = 0

    def read(self, route: Route, name: bytes | None, data: bytes) -> None:
        """Take one event."""
        if name is None:  # an engine that names no events: the type is in the data
            with contextlib.suppress(orjson.JSONDecodeError, AttributeError, TypeError):
                name = str(orjson.loads(data).get("type", "")).encode()
        if route is Route.RESPONSES:
            self._responses(name, data)
        else:
            self._messages(name, data)

    def _responses(self, name: bytes | None, data: bytes) -> None:
        if name == b"response.output_text.delta":
            self.deltas += 1
        elif name in (b"response.completed", b"response.incomplete", b"response.failed"):
            self.finished = True
            response = _parsed(data).get("response")
            if isinstance(response, dict):
                self.usage = normalized_usage(response.get("usage")) or self.usage
            if name == b"response.failed":
                self.error = "the engine's response failed"
        elif name == b"error":
            self.error = "upstream sent an error event"

    def _messages(self, name: bytes | None, data: bytes) -> None:
        if name == b"content_block_delta":
            self.deltas += 1
        elif name in (b"message_start", b"message_delta"):
            parsed = _parsed(data)
            message = parsed.get("message")
            usage = (message if isinstance(message, dict) else parsed).get("usage")
            if isinstance(usage, dict):
                # message_start carries the input tokens, message_delta the output so far.
                merged = {**(self._raw_usage or {}), **usage}
                self._raw_usage = merged
                self.usage = normalized_usage(merged)
        elif name == b"message_stop":
            self.finished = True
        elif name == b"error":
            self.error = "upstream sent an error event"


def _parsed(data: bytes) -> dict[str, Any]:
    with contextlib.suppress(orjson.JSONDecodeError):
        parsed = orjson.loads(data)
        if isinstance(parsed, dict):
            return parsed
    return {}


def _event_data(event: bytes) -> bytes | None:
    values = [line[5:] for line in event.split(b"\n") if line.startswith(b"data:")]
    if not values:
        return None
    return b"\n".join(value[1:] if value.startswith(b" ") else value for value in values)


def estimated_usage(request: ProxyRequest, deltas: int) -> dict[str, Any] | None:
    """Usage of a stream that ended without the engine's usage chunk, from its `deltas` (the
    choice chunks received); None when it produced nothing.

    vLLM sends about one token per chunk, so chunks are a fair count of completion tokens, less
    the one role chunk per choice that opens a chat stream (tool calls and multi-token chunks
    are undercounted). Prompt tokens are not known without the engine's tokenizer: 0.
    """
    if request.route is Route.CHAT:
        n = request.body.get("n")
        deltas -= n if type(n) is int and n > 0 else 1
    if deltas <= 0:
        return None
    return {
        "prompt_tokens": 0,
        "completion_tokens": deltas,
        "total_tokens": deltas,
        "estimated": True,
    }


def _error_bytes(message: str, *, error_type: str, code: str) -> bytes:
    return orjson.dumps(error_body(message, error_type=error_type, code=code))


def _sse(*data: bytes) -> bytes:
    """Events with these data (a multi-line one as several `data:` lines)."""
    lines = (value.replace(b"\n", b"\ndata: ") if b"\n" in value else value for value in data)
    return b"data: " + b"\n\ndata: ".join(lines) + b"\n\n"


class StreamConsumer(abc.ABC):
    """Reads an upstream stream chunk by chunk: what to relay, whether it finished, its usage,
    an error event, and its deltas (the fallback token count)."""

    __slots__ = ("deltas", "error", "finished", "seen", "usage")

    def __init__(self) -> None:
        self.seen = 0  # events read
        self.deltas = 0
        self.finished = False
        self.usage: dict[str, Any] | None = None
        self.error: str | None = None

    @abc.abstractmethod
    def feed(self, chunk: bytes) -> bytes:
        """What the client gets for this chunk (nothing until an event is complete)."""

    def close(self) -> bytes:
        """What the client gets after a stream that finished (a translation's last events)."""
        return b""


class ChatEventConsumer(StreamConsumer):
    """The OpenAI chat and completion streams: `data:` events ending with `data: [DONE]`."""

    __slots__ = ("_decoder", "_wants_usage")

    def __init__(self, wants_usage: bool) -> None:
        super().__init__()
        self._decoder = SSEDecoder()
        self._wants_usage = wants_usage

    def feed(self, chunk: bytes) -> bytes:
        relayed: list[bytes] = []
        for data in self._decoder.feed(chunk):
            self.seen += 1
            if data == SSE_DONE:
                self.finished = True
            elif data.startswith(b'{"error"'):
                self.error = "upstream sent an error event"
            elif b'"usage":{' in data:
                parsed = orjson.loads(data)
                self.usage = parsed.get("usage")
                # The extra usage chunk was asked for by the gateway, not the client.
                if not self._wants_usage and not parsed.get("choices"):
                    continue
            else:
                self.deltas += 1
            relayed.append(data)
        return _sse(*relayed) if relayed else b""


class NamedEventConsumer(StreamConsumer):
    """The Responses API's and Anthropic's streams: named events, relayed with their names,
    ending with a terminal event (response.completed, message_stop)."""

    __slots__ = ("_decoder", "_reader", "_route")

    def __init__(self, route: Route) -> None:
        super().__init__()
        self._route = route
        self._decoder = NamedSSEDecoder()
        self._reader = EventReader()

    def feed(self, chunk: bytes) -> bytes:
        events = self._decoder.feed(chunk)
        if not events:
            return b""
        reader = self._reader
        for name, data in events:
            reader.read(self._route, name, data)
        self.seen += len(events)
        self.deltas, self.finished = reader.deltas, reader.finished
        self.usage, self.error = reader.usage, reader.error
        return b"".join(named_event(name, data) for name, data in events)


class RelayResponse(Response):
    """Sends the request upstream inside the ASGI call and relays the answer."""

    def __init__(
        self,
        *,
        session: aiohttp.ClientSession,
        request: ProxyRequest,
        target: Target,
        timeout_s: float,
        idle_timeout_s: float,
        connect_timeout_s: float,
        on_finish: Callable[[Outcome], None],
        extra_headers: dict[str, str] | None = None,
        on_unreachable: Callable[[], None] | None = None,
    ) -> None:
        super().__init__()
        self._on_unreachable = on_unreachable
        self._extra_headers = [
            (name.lower().encode(), value.encode()) for name, value in (extra_headers or {}).items()
        ]
        self._session = session
        self._request = request
        self._target = target
        self._timeout_s = timeout_s
        self._idle_timeout_s = idle_timeout_s
        self._connect_timeout_s = connect_timeout_s
        self._on_finish = on_finish
        self.outcome = Outcome()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Run the upstream call while watching for the client to disconnect."""
        relay = self._relay_stream if self._request.stream else self._relay_whole
        work = asyncio.ensure_future(relay(send))
        watcher = asyncio.ensure_future(_wait_for_disconnect(receive))
        try:
            await asyncio.wait({work, watcher}, return_when=asyncio.FIRST_COMPLETED)
            if watcher.done() and not work.done():
                self.outcome.disconnected = True
                self.outcome.error = self.outcome.error or "client disconnected"
        finally:
            # Cancelling the relay closes its upstream response: the engine sees the abort.
            for task in (work, watcher):
                task.cancel()
            results = await asyncio.gather(work, watcher, return_exceptions=True)
            self._on_finish(self.outcome)
        failure = results[0]
        if isinstance(failure, Exception) and not self.outcome.disconnected:
            raise failure

    # -- pieces ------------------------------------------------------------------------------

    def _upstream(self) -> tuple[str, bytes | aiohttp.FormData]:
        """The URL and body to send (a translating relay sends another route's)."""
        url = upstream_url(self._target.api_base, self._request.route)
        return url, upstream_body(self._request, self._target)

    def _request_headers(self) -> dict[str, str]:
        return {**_REQUEST_HEADERS, **self._target.headers}

    async def _post(self, timeouts: aiohttp.ClientTimeout) -> aiohttp.ClientResponse:
        """Send the request; the response once its headers are in."""
        url, body = self._upstream()
        return await self._session.post(
            url,
            data=body,
            headers=self._request_headers(),
            timeout=timeouts,
            allow_redirects=False,
        )

    def _response_headers(self, content_type: bytes, upstream_error: bool) -> list[Any]:
        headers = [
            (b"content-type", content_type),
            (b"x-gateway-route", self._target.route_name.encode()),
        ]
        if upstream_error:
            headers.append((b"x-error-source", b"upstream"))
        headers.extend(self._extra_headers)
        return headers

    async def _send_gateway_error(self, send: Send, status: int, message: str, code: str) -> None:
        self.outcome.status, self.outcome.error = status, message
        error_type = "timeout_error" if status == 504 else "service_unavailable_error"
        body = error_answer(self._request.route, status, message, code=code, error_type=error_type)
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", b"%d" % len(body)),
            (b"x-error-source", b"gateway"),
            (b"x-gateway-route", self._target.route_name.encode()),
        ]
        if status == 503:
            headers.append((b"retry-after", b"5"))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    async def _upstream_timeout(self, send: Send) -> None:
        message = f"The {self._target.route_name} engine did not answer in time."
        await self._send_gateway_error(send, 504, message, "upstream_timeout")

    async def _unreachable(self, send: Send, exc: Exception) -> None:
        if self._on_unreachable is not None:
            self._on_unreachable()
        name = self._target.route_name
        message = f"The {name} engine is unreachable ({type(exc).__name__})."
        await self._send_gateway_error(send, 503, message, "engine_unavailable")

    async def _send_whole(
        self, send: Send, response: aiohttp.ClientResponse, content: bytes, upstream_error: bool
    ) -> None:
        """Relay a response read whole: its status, content type and body."""
        status = response.status
        self.outcome.status = status
        if status == 200:
            with contextlib.suppress(orjson.JSONDecodeError, AttributeError):
                self.outcome.usage = normalized_usage(orjson.loads(content).get("usage"))
        else:
            self.outcome.error = f"upstream returned {status}"
        content = self._whole_answer(status, content)
        content_type = response.headers.get("content-type", "application/json").encode()
        headers = self._response_headers(content_type, upstream_error)
        headers.append((b"content-length", b"%d" % len(content)))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": content})

    def _whole_answer(self, status: int, content: bytes) -> bytes:
        """What the client gets for the upstream's whole answer (a translating relay's own)."""
        return content

    async def _relay_whole(self, send: Send) -> None:
        timeouts = aiohttp.ClientTimeout(total=self._timeout_s, connect=self._connect_timeout_s)
        try:
            response = await self._post(timeouts)
            # Read to its end, the connection goes back to the pool; should reading fail or be
            # cancelled (the client left), aiohttp closes it and the engine sees the abort.
            content = await response.read()
        except TimeoutError:  # aiohttp's timeouts (ServerTimeoutError...) included
            await self._upstream_timeout(send)
            return
        except (aiohttp.ClientError, OSError) as exc:
            await self._unreachable(send, exc)
            return
        self.outcome.first_byte_s = time.perf_counter() - self.outcome.started
        await self._send_whole(send, response, content, upstream_error=response.status >= 400)

    async def _relay_stream(self, send: Send) -> None:
        # sock_read is per read: a stream that stalls for idle_timeout_s ends (its headers
        # too must come within it, as with httpx's read timeout before). The route timeout
        # bounds the wait for the first event (engines send their headers before the first
        # token, so the headers alone say little), not the stream.
        timeouts = aiohttp.ClientTimeout(
            total=None, connect=self._connect_timeout_s, sock_read=self._idle_timeout_s
        )
        deadline = asyncio.get_running_loop().time() + self._timeout_s
        try:
            async with asyncio.timeout_at(deadline):
                response = await self._post(timeouts)
                # An error answer is read whole, still before anything reached the client
                # (aiohttp closes the response should that fail).
                content = None if response.status == 200 else await response.read()
        except TimeoutError:
            await self._upstream_timeout(send)
            return
        except (aiohttp.ClientError, OSError) as exc:
            await self._unreachable(send, exc)
            return
        if content is not None:
            await self._send_whole(send, response, content, upstream_error=True)
            return
        try:
            await self._relay_events(response, send, deadline)
        finally:
            if response.content.at_eof():
                response.release()  # read to its end: the connection goes back to the pool
            else:
                response.close()  # cut short (stall, loss, client gone): the engine sees it

    def _consumer(self) -> StreamConsumer:
        """What reads this route's stream (a translating relay reads another route's)."""
        if self._request.route in NAMED_EVENT_ROUTES:
            return NamedEventConsumer(self._request.route)
        return ChatEventConsumer(self._request.client_wants_usage)

    async def _relay_events(
        self, response: aiohttp.ClientResponse, send: Send, first_event_by: float
    ) -> None:
        headers = [
            *self._response_headers(b"text/event-stream", False),
            (b"cache-control", b"no-cache"),
            (b"x-accel-buffering", b"no"),
        ]
        self.outcome.status = 200
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        consumer = self._consumer()
        first_event = asyncio.timeout_at(first_event_by)  # lifted at the first event
        try:
            async with first_event:
                async for chunk in response.content.iter_any():
                    relayed = consumer.feed(chunk)
                    if self.outcome.first_byte_s is None and consumer.seen:
                        self.outcome.first_byte_s = time.perf_counter() - self.outcome.started
                        first_event.reschedule(None)
                    if relayed:
                        await _send_more(send, relayed)
        except TimeoutError:
            if first_event.expired():  # the route timeout, before the engine's first event
                await self._stream_error(
                    send, f"The {self._target.route_name} engine did not answer in time.",
                    "upstream_timeout", "timeout_error",
                )  # fmt: skip
                return
            # sock_read: nothing came for idle_timeout_s
            await self._stream_error(
                send, f"The engine sent nothing for {self._idle_timeout_s:g}s; stream ended.",
                "upstream_stalled", "timeout_error",
            )  # fmt: skip
            return
        except aiohttp.ClientError as exc:  # ClientPayloadError, ServerDisconnectedError...
            await self._stream_error(
                send, f"The connection to the engine was lost mid-stream ({type(exc).__name__}).",
                "upstream_disconnected", "service_unavailable_error",
            )  # fmt: skip
            return
        finally:
            self.outcome.error = self.outcome.error or consumer.error
            # A stream cut short (client gone, engine stalled, died or failed) never gets the
            # usage chunk; the tokens it produced still count, estimated from what came.
            self.outcome.usage = consumer.usage or estimated_usage(self._request, consumer.deltas)
        if not consumer.finished and self.outcome.error is None:
            await self._stream_error(
                send, "The engine ended the stream without finishing it.",
                "upstream_incomplete", "service_unavailable_error",
            )  # fmt: skip
            return
        closing = consumer.close()
        if closing:
            await _send_more(send, closing)
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _stream_error(self, send: Send, message: str, code: str, error_type: str) -> None:
        self.outcome.error = message
        event = stream_error_event(self._request.route, message, code=code, error_type=error_type)
        await _send_more(send, event)
        await send({"type": "http.response.body", "body": b"", "more_body": False})


async def _send_more(send: Send, body: bytes) -> None:
    await send({"type": "http.response.body", "body": body, "more_body": True})


async def _wait_for_disconnect(receive: Receive) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return
