"""ASGI plumbing shared by the simulator's routes: types, body reading, sending, dying."""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from simulator.errors import SimulatorRequestError

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

logger = logging.getLogger("simulator")

MAX_BODY_BYTES = 64 * 1024 * 1024

JSON = b"application/json"
SSE_HEADERS = [(b"content-type", b"text/event-stream; charset=utf-8")]


async def read_body(receive: Receive) -> bytes | None:
    """The whole request body, or ``None`` when the client went away first."""
    message = await receive()
    if message["type"] != "http.request":
        return None
    body: bytes = message.get("body", b"")
    if not message.get("more_body", False):
        return body
    parts = [body]
    size = len(body)
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return None
        chunk: bytes = message.get("body", b"")
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise SimulatorRequestError("Request body too large.", 413)
        parts.append(chunk)
        if not message.get("more_body", False):
            return b"".join(parts)


async def wait_for_disconnect(receive: Receive) -> None:
    """Return once the client has gone away (``http.disconnect``)."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


async def disconnected_within(watcher: asyncio.Task[None], seconds: float) -> bool:
    """Wait ``seconds``, returning early (and ``True``) if the client goes away."""
    if watcher.done():
        return True
    done, _ = await asyncio.wait((watcher,), timeout=seconds)
    return bool(done)


async def send_bytes(
    send: Send,
    status: int,
    body: bytes,
    content_type: bytes = JSON,
    extra_headers: list[tuple[bytes, bytes]] | None = None,
) -> None:
    """Send a complete response with ``Content-Length``."""
    headers = [(b"content-type", content_type), (b"content-length", b"%d" % len(body))]
    if extra_headers:
        headers.extend(extra_headers)
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


def exit_process(reason: str) -> None:
    """Die like a crashed engine: no cleanup, no response completion, exit status 1."""
    logger.error("vLLM SIMULATOR: %s; exiting the process abruptly (injected fault)", reason)
    for handler in logging.getLogger().handlers + logger.handlers:
        handler.flush()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(1)
