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

from gateway.errors import error_body
from gateway.proxy.validation import ProxyRequest, Route

ROUTE_SUFFIX = {
    Route.CHAT: "/chat/completions",
    Route.COMPLETIONS: "/completions",
    Route.EMBEDDINGS: "/embeddings",
}
_DONE = b"[DONE]"
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


def upstream_body(request: ProxyRequest, target: Target) -> bytes:
    """The client's body with the upstream's model name, asking a stream for its usage."""
    body = dict(request.body)
    body["model"] = target.model
    if request.stream:
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

    async def _post(self, timeouts: aiohttp.ClientTimeout) -> aiohttp.ClientResponse:
        """Send the request; the response once its headers are in."""
        return await self._session.post(
            self._target.api_base.rstrip("/") + ROUTE_SUFFIX[self._request.route],
            data=upstream_body(self._request, self._target),
            headers={**_REQUEST_HEADERS, **self._target.headers},
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
        body = _error_bytes(message, error_type=error_type, code=code)
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
                self.outcome.usage = orjson.loads(content).get("usage")
        else:
            self.outcome.error = f"upstream returned {status}"
        content_type = response.headers.get("content-type", "application/json").encode()
        headers = self._response_headers(content_type, upstream_error)
        headers.append((b"content-length", b"%d" % len(content)))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": content})

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
        wants_usage = self._request.client_wants_usage
        decoder = SSEDecoder()
        finished = False
        deltas = 0  # choice chunks received: the fallback token count (estimated_usage)
        first_event = asyncio.timeout_at(first_event_by)  # lifted at the first event
        try:
            async with first_event:
                async for chunk in response.content.iter_any():
                    relayed: list[bytes] = []
                    for data in decoder.feed(chunk):
                        if self.outcome.first_byte_s is None:
                            self.outcome.first_byte_s = time.perf_counter() - self.outcome.started
                            first_event.reschedule(None)
                        if data == _DONE:
                            finished = True
                        elif data.startswith(b'{"error"'):
                            self.outcome.error = "upstream sent an error event"
                        elif b'"usage":{' in data:
                            parsed = orjson.loads(data)
                            self.outcome.usage = parsed.get("usage")
                            # The extra usage chunk was asked for by the gateway, not the client.
                            if not wants_usage and not parsed.get("choices"):
                                continue
                        else:
                            deltas += 1
                        relayed.append(data)
                    if relayed:
                        await _send_more(send, _sse(*relayed))
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
            # A stream cut short (client gone, engine stalled, died or failed) never gets the
            # usage chunk; the tokens it produced still count, estimated from what came.
            if self.outcome.usage is None:
                self.outcome.usage = estimated_usage(self._request, deltas)
        if not finished and self.outcome.error is None:
            await self._stream_error(
                send, "The engine ended the stream without finishing it.",
                "upstream_incomplete", "service_unavailable_error",
            )  # fmt: skip
            return
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    async def _stream_error(self, send: Send, message: str, code: str, error_type: str) -> None:
        self.outcome.error = message
        await _send_more(send, _sse(_error_bytes(message, error_type=error_type, code=code)))
        await send({"type": "http.response.body", "body": b"", "more_body": False})


async def _send_more(send: Send, body: bytes) -> None:
    await send({"type": "http.response.body", "body": body, "more_body": True})


async def _wait_for_disconnect(receive: Receive) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return
