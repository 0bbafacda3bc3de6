"""A streamed request that waits for a model that is loading: its 200 and progress comments now,
the relay once it is admitted.

A switch takes seconds to minutes; a streaming client (or a proxy in front of it) that hears
nothing that long may give up. So, once such a request has waited a while, its SSE stream starts
with a comment line (`: model <name> is loading`), repeated every few seconds while the model
loads; comments are ignored by SSE clients, and the engine's stream follows unchanged. What would
have been an error status after that point (queue timeout, a gateway 504, an engine's error
answer) becomes an error event, as for errors after the 200 of any stream.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any

import orjson
from starlette.responses import Response
from starlette.types import Message, Receive, Scope, Send

from gateway.errors import GatewayError, error_body, error_type_for
from gateway.proxy.scheduler import Lease
from gateway.proxy.upstream import RelayResponse, stream_error_event
from gateway.proxy.validation import Route

_SSE_HEADERS = [
    (b"content-type", b"text/event-stream"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),
]


def loading_comment(name: str) -> bytes:
    """The SSE comment that tells a waiting client its model is loading."""
    # A name is a served model name (no newline can end the comment early); be safe anyway.
    return b": model " + name.replace("\n", " ").encode() + b" is loading\n\n"


class LoadingRelay(RelayResponse):
    """The response of a streamed request still waiting for its lease while its model loads.

    It sends the 200 and a loading comment at once, another every `interval_s` while the model
    is loading, and relays the request once `acquiring` yields a lease (`build` makes the
    relay, whose own 200 is then dropped). Not a relay itself until then: it subclasses
    RelayResponse only to stand where one is expected, and sets none of its fields.
    """

    def __init__(
        self,
        *,
        acquiring: asyncio.Future[Lease],
        build: Callable[[Lease], Response],
        loading: Callable[[], str | None],
        interval_s: float,
        extra_headers: dict[str, str] | None = None,
        route: Route = Route.CHAT,
    ) -> None:
        Response.__init__(self)  # deliberately not RelayResponse's: there is no target yet
        self._route = route
        self._acquiring = acquiring
        self._build = build
        self._loading = loading
        self._interval_s = interval_s
        self._start_headers = _SSE_HEADERS + [
            (name.lower().encode(), value.encode()) for name, value in (extra_headers or {}).items()
        ]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Start the stream, keep the client posted until admitted, then relay."""
        await send({"type": "http.response.start", "status": 200, "headers": self._start_headers})
        lease = await self._wait(receive, send)
        if lease is not None:
            await self._build(lease)(scope, receive, _AfterStart(send, self._route))

    async def _wait(self, receive: Receive, send: Send) -> Lease | None:
        """The lease; None when the wait ended otherwise (client gone, or an error event)."""
        acquiring = self._acquiring
        gone = asyncio.ensure_future(_disconnect(receive))
        either: set[asyncio.Future[Any]] = {acquiring, gone}
        try:
            name = self._loading()
            while True:
                if name is not None:
                    await send(_more(loading_comment(name)))
                done, _ = await asyncio.wait(
                    either, timeout=self._interval_s, return_when=asyncio.FIRST_COMPLETED
                )
                if acquiring in done:
                    break
                if gone in done:
                    await drop(acquiring)
                    return None
                name = self._loading()
        except BaseException:  # shutdown, a failed send: no lease may outlive this response
            abandon(acquiring)
            raise
        finally:
            # The relay watches for the disconnect itself from here on.
            gone.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await gone
        try:
            return acquiring.result()
        except GatewayError as exc:
            # Queue timeout, model not found or not fitting...: too late for a status.
            if self._route is Route.CHAT or self._route is Route.COMPLETIONS:
                error = error_body(
                    exc.message, error_type=exc.error_type, code=exc.code, param=exc.param
                )
                event = _event(error)
            else:
                event = stream_error_event(
                    self._route, exc.message, code=exc.code or "", error_type=exc.error_type
                )
            await send({"type": "http.response.body", "body": event, "more_body": False})
            return None


async def drop(acquiring: asyncio.Future[Lease]) -> None:
    """Stop waiting for a lease (the client left), releasing one that came meanwhile."""
    acquiring.cancel()
    with contextlib.suppress(asyncio.CancelledError, GatewayError):
        lease = await acquiring
        lease.release()


def abandon(acquiring: asyncio.Future[Lease]) -> None:
    """Like drop, without waiting (for a task being cancelled): the lease, should one come, is
    released when it does."""
    acquiring.cancel()
    acquiring.add_done_callback(_release_if_leased)


def _release_if_leased(acquiring: asyncio.Future[Lease]) -> None:
    if not acquiring.cancelled() and acquiring.exception() is None:
        acquiring.result().release()


class _AfterStart:
    """The ASGI `send` of a relay whose 200 was sent already (by LoadingRelay).

    The relay's own 200 start is dropped and its events pass; an error answer (a gateway 504 or
    503, an engine's error status), which it sends whole, becomes one error event.
    """

    __slots__ = ("_body", "_route", "_send", "_status")

    def __init__(self, send: Send, route: Route) -> None:
        self._route = route
        self._send = send
        self._status = 200
        self._body = b""

    async def __call__(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self._status = message["status"]
            return
        if self._status == 200 or message["type"] != "http.response.body":
            await self._send(message)
            return
        self._body += message.get("body", b"")
        if not message.get("more_body", False):
            body = {**message, "body": _error_event(self._route, self._status, self._body)}
            await self._send(body)


def _error_event(route: Route, status: int, body: bytes) -> bytes:
    """An error answer as an SSE error event: its envelope if it has one, else a new one (the
    route's own error event on the Responses and Anthropic routes)."""
    try:
        parsed: Any = orjson.loads(body)
    except orjson.JSONDecodeError:
        parsed = None
    error = parsed.get("error") if isinstance(parsed, dict) else None
    if route is Route.CHAT or route is Route.COMPLETIONS:
        if not isinstance(error, dict):
            message = f"The engine answered {status}: {body[:200].decode(errors='replace')}"
            parsed = error_body(message, error_type=error_type_for(status))
        return _event(parsed)
    detail = error.get("message") if isinstance(error, dict) else None
    code = error.get("code") if isinstance(error, dict) else None
    message = (
        detail
        if isinstance(detail, str)
        else f"The engine answered {status}: {body[:200].decode(errors='replace')}"
    )
    return stream_error_event(
        route,
        message,
        code=code if isinstance(code, str) else f"http_{status}",
        error_type=error_type_for(status),
    )


def _event(data: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(data) + b"\n\n"


def _more(body: bytes) -> Message:
    return {"type": "http.response.body", "body": body, "more_body": True}


async def _disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        continue
