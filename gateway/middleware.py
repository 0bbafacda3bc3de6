"""Pure ASGI middleware: request id, one structured log line per request, last-resort 500."""

from __future__ import annotations

import re
import time
import uuid

import structlog
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway.errors import (
    HEADERS_TOO_LARGE_BODY,
    INTERNAL_ERROR_BODY,
    INTERNAL_ERROR_MESSAGE,
    error_bytes_for,
)
from gateway.logging import get_logger
from gateway.metrics import HTTP

log = get_logger("gateway.access")

REQUEST_ID_HEADER = b"x-request-id"
# A client-supplied id is echoed into logs and headers, so only a safe shape is accepted.
_VALID_REQUEST_ID = re.compile(rb"^[A-Za-z0-9._:-]{1,128}$")


def _request_id_from(scope: Scope) -> str:
    for name, value in scope["headers"]:
        if name == REQUEST_ID_HEADER and _VALID_REQUEST_ID.match(value):
            return bytes(value).decode("ascii")
    return uuid.uuid4().hex


class RequestContextMiddleware:
    """Bind a request id to every log line, return it, log each request once."""

    def __init__(self, app: ASGIApp, *, max_header_bytes: int = 32 * 1024) -> None:
        self.app = app
        self.max_header_bytes = max_header_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Handle one ASGI call."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = _request_id_from(scope)
        # A request's own state: servers copy the lifespan state per request, not every harness.
        scope["state"] = {**(scope.get("state") or {}), "request_id": request_id}
        structlog.contextvars.clear_contextvars()
        structlog.contextvars.bind_contextvars(request_id=request_id)
        started = time.perf_counter()
        status = 0
        header_value = request_id.encode("ascii")

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [
                    *message.get("headers", []),
                    (REQUEST_ID_HEADER, header_value),
                ]
            await send(message)

        header_bytes = sum(len(name) + len(value) for name, value in scope["headers"])
        if header_bytes > self.max_header_bytes:
            status = 431
            await send_with_id(
                {
                    "type": "http.response.start",
                    "status": 431,
                    "headers": [
                        (b"content-type", b"application/json"),
                        (b"x-error-source", b"gateway"),
                    ],
                }
            )
            await send(
                {
                    "type": "http.response.body",
                    "body": error_bytes_for(
                        scope["path"], HEADERS_TOO_LARGE_BODY, 431, "Request headers are too large."
                    ),
                }
            )
            self._log(scope, status, started)
            return
        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            log.exception("unhandled_error", path=scope["path"], method=scope["method"])
            if status == 0:
                status = 500
                await send_with_id(
                    {
                        "type": "http.response.start",
                        "status": 500,
                        "headers": [(b"content-type", b"application/json")],
                    }
                )
                await send(
                    {
                        "type": "http.response.body",
                        "body": error_bytes_for(
                            scope["path"], INTERNAL_ERROR_BODY, 500, INTERNAL_ERROR_MESSAGE
                        ),
                    }
                )
        finally:
            self._log(scope, status, started)

    @staticmethod
    def _log(scope: Scope, status: int, started: float) -> None:
        elapsed = time.perf_counter() - started
        state = scope.get("state", {})
        template = _route_template(scope)
        HTTP.observe(template, scope["method"], status, elapsed)
        log.info(
            "request",
            method=scope["method"],
            path=template or str(scope["path"]),
            status=status,
            duration_ms=round(elapsed * 1000, 2),
            user_id=state.get("user_id"),
            key_id=state.get("key_id"),
            model=state.get("model"),
            upstream=state.get("upstream"),
            usage=state.get("usage"),
        )
        structlog.contextvars.clear_contextvars()


def _route_template(scope: Scope) -> str | None:
    # The matched route template keeps ids out of logs and metric labels; None: no route.
    path = getattr(scope.get("route"), "path", None)
    return path if isinstance(path, str) else None
