"""Relay one request to an upstream (local engine or cloud) and the answer back to the client.

The relay is a raw ASGI response: it watches `receive()` for the client going away while it
waits on the upstream, so a disconnect cancels the upstream request at once (Starlette's
StreamingResponse would only notice on its next send), for streams and whole responses alike.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import orjson
from httpx_sse import EventSource
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from gateway.errors import error_body
from gateway.proxy.validation import ProxyRequest, Route

ROUTE_SUFFIX = {
    Route.CHAT: "/chat/completions",
    Route.COMPLETIONS: "/completions",
    Route.EMBEDDINGS: "/embeddings",
}
_DONE = b"data: [DONE]\n\n"


@dataclass(frozen=True)
class Target:
    """Where one request goes: an OpenAI base URL (ending in /v1), the model name it knows."""

    route_name: str  # "local" or "cloud"
    api_base: str
    model: str
    headers: dict[str, str] = field(default_factory=dict)


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


def _error_bytes(message: str, *, error_type: str, code: str) -> bytes:
    return orjson.dumps(error_body(message, error_type=error_type, code=code))


def _sse(data: bytes) -> bytes:
    return b"data: " + data + b"\n\n"


class RelayResponse(Response):
    """Sends the request upstream inside the ASGI call and relays the answer."""

    def __init__(
        self,
        *,
        http: httpx.AsyncClient,
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
        self._http = http
        self._request = request
        self._target = target
        self._timeout_s = timeout_s
        self._idle_timeout_s = idle_timeout_s
        self._connect_timeout_s = connect_timeout_s
        self._on_finish = on_finish
        self.outcome = Outcome()
        self._started = False

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
            for task in (work, watcher):
                task.cancel()
            results = await asyncio.gather(work, watcher, return_exceptions=True)
            self._on_finish(self.outcome)
        failure = results[0]
        if isinstance(failure, Exception) and not self.outcome.disconnected:
            raise failure

    # -- pieces ------------------------------------------------------------------------------

    def _url(self) -> str:
        return self._target.api_base.rstrip("/") + ROUTE_SUFFIX[self._request.route]

    def _upstream_headers(self) -> dict[str, str]:
        return {"content-type": "application/json", **self._target.headers}

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
            (b"x-error-source", b"gateway"),
            (b"x-gateway-route", self._target.route_name.encode()),
        ]
        if status == 503:
            headers.append((b"retry-after", b"5"))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    async def _unreachable(self, send: Send, exc: Exception) -> None:
        if self._on_unreachable is not None:
            self._on_unreachable()
        name = self._target.route_name
        message = f"The {name} engine is unreachable ({type(exc).__name__})."
        await self._send_gateway_error(send, 503, message, "engine_unavailable")

    async def _relay_whole(self, send: Send) -> None:
        timeout = httpx.Timeout(self._timeout_s, connect=self._connect_timeout_s)
        try:
            response = await self._http.post(
                self._url(),
                content=upstream_body(self._request, self._target),
                headers=self._upstream_headers(),
                timeout=timeout,
            )
        except httpx.TimeoutException:
            await self._send_gateway_error(
                send, 504, f"The {self._target.route_name} engine did not answer in time.",
                "upstream_timeout",
            )  # fmt: skip
            return
        except httpx.HTTPError as exc:
            await self._unreachable(send, exc)
            return
        self.outcome.first_byte_s = time.perf_counter() - self.outcome.started
        self.outcome.status = response.status_code
        content = response.content
        if response.status_code == 200:
            with contextlib.suppress(orjson.JSONDecodeError, AttributeError):
                self.outcome.usage = orjson.loads(content).get("usage")
        else:
            self.outcome.error = f"upstream returned {response.status_code}"
        content_type = response.headers.get("content-type", "application/json").encode()
        headers = self._response_headers(content_type, response.status_code >= 400)
        await send(
            {"type": "http.response.start", "status": response.status_code, "headers": headers}
        )
        await send({"type": "http.response.body", "body": content})

    async def _relay_stream(self, send: Send) -> None:
        # The read timeout is per chunk: a stream that stalls for idle_timeout_s ends.
        timeout = httpx.Timeout(
            self._timeout_s, connect=self._connect_timeout_s, read=self._idle_timeout_s
        )
        request = self._http.build_request(
            "POST",
            self._url(),
            content=upstream_body(self._request, self._target),
            headers=self._upstream_headers(),
            timeout=timeout,
        )
        try:
            response = await self._http.send(request, stream=True)
        except httpx.TimeoutException:
            await self._send_gateway_error(
                send, 504, f"The {self._target.route_name} engine did not answer in time.",
                "upstream_timeout",
            )  # fmt: skip
            return
        except httpx.HTTPError as exc:
            await self._unreachable(send, exc)
            return
        try:
            await self._relay_events(response, send)
        finally:
            await response.aclose()

    async def _relay_events(self, response: httpx.Response, send: Send) -> None:
        self.outcome.status = response.status_code
        if response.status_code != 200:
            content = await response.aread()
            self.outcome.error = f"upstream returned {response.status_code}"
            content_type = response.headers.get("content-type", "application/json").encode()
            await send(
                {
                    "type": "http.response.start",
                    "status": response.status_code,
                    "headers": self._response_headers(content_type, True),
                }
            )
            await send({"type": "http.response.body", "body": content})
            return
        headers = [
            *self._response_headers(b"text/event-stream", False),
            (b"cache-control", b"no-cache"),
            (b"x-accel-buffering", b"no"),
        ]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        wants_usage = self._request.client_wants_usage
        finished = False
        try:
            async for event in EventSource(response).aiter_sse():
                data = event.data.encode()
                if self.outcome.first_byte_s is None:
                    self.outcome.first_byte_s = time.perf_counter() - self.outcome.started
                if data == b"[DONE]":
                    finished = True
                    await _send_more(send, _DONE)
                    continue
                if data.startswith(b'{"error"'):
                    self.outcome.error = "upstream sent an error event"
                elif b'"usage":{' in data:
                    chunk = orjson.loads(data)
                    self.outcome.usage = chunk.get("usage")
                    # The extra usage chunk was asked for by the gateway, not the client.
                    if not wants_usage and not chunk.get("choices"):
                        continue
                await _send_more(send, _sse(data))
        except httpx.ReadTimeout:
            await self._stream_error(
                send, f"The engine sent nothing for {self._idle_timeout_s:g}s; stream ended.",
                "upstream_stalled", "timeout_error",
            )  # fmt: skip
            return
        except httpx.HTTPError as exc:
            await self._stream_error(
                send, f"The connection to the engine was lost mid-stream ({type(exc).__name__}).",
                "upstream_disconnected", "service_unavailable_error",
            )  # fmt: skip
            return
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
