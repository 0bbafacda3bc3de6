"""The one OpenAI-shaped error envelope and the handlers that produce it, the database's
included: one handler answers a database that is down with 503 on every route."""

from __future__ import annotations

from http import HTTPStatus
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from sqlalchemy.exc import DBAPIError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from gateway.db import is_database_down, sqlstate
from gateway.logging import get_logger
from gateway.responses import JSONResponse

log = get_logger(__name__)

# How long a client is asked to wait before retrying a request the database could not serve.
DATABASE_RETRY_AFTER_S = 5
# SQLSTATE 22021 character_not_in_repertoire, 22P05 untranslatable_character: what Postgres
# says about a NUL in text.
_TEXT_SQLSTATES = frozenset({"22021", "22P05"})

_TYPE_BY_STATUS = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    409: "conflict_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    503: "service_unavailable_error",
    504: "timeout_error",
}


class GatewayError(Exception):
    """An error the gateway itself raises; rendered as the OpenAI error envelope."""

    def __init__(
        self,
        status_code: int,
        message: str,
        *,
        code: str | None = None,
        param: str | None = None,
        error_type: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.message = message
        self.code = code
        self.param = param
        self.error_type = error_type or error_type_for(status_code)
        self.headers = headers


def error_type_for(status_code: int) -> str:
    """Map an HTTP status to the OpenAI error `type` string."""
    if status_code >= 500:
        return _TYPE_BY_STATUS.get(status_code, "server_error")
    return _TYPE_BY_STATUS.get(status_code, "invalid_request_error")


def error_body(
    message: str, *, error_type: str, code: str | None = None, param: str | None = None
) -> dict[str, Any]:
    """Build `{"error": {"message", "type", "param", "code"}}`."""
    return {"error": {"message": message, "type": error_type, "param": param, "code": code}}


# Anthropic's Messages API routes answer errors in Anthropic's envelope (what its SDKs parse).
ANTHROPIC_PATH_PREFIX = "/v1/messages"
_ANTHROPIC_TYPE_BY_STATUS = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    503: "overloaded_error",
    529: "overloaded_error",
    504: "timeout_error",
}


def speaks_anthropic(path: str) -> bool:
    """Whether errors on this path take Anthropic's envelope (/v1/messages and below)."""
    return path == ANTHROPIC_PATH_PREFIX or path.startswith(ANTHROPIC_PATH_PREFIX + "/")


def anthropic_error_type(status_code: int) -> str:
    """Anthropic's error `type` for an HTTP status."""
    if status_code >= 500:
        return _ANTHROPIC_TYPE_BY_STATUS.get(status_code, "api_error")
    return _ANTHROPIC_TYPE_BY_STATUS.get(status_code, "invalid_request_error")


def anthropic_error_body(message: str, *, status_code: int) -> dict[str, Any]:
    """Build Anthropic's `{"type": "error", "error": {"type", "message"}}`."""
    return {
        "type": "error",
        "error": {"type": anthropic_error_type(status_code), "message": message},
    }


def error_response(
    status_code: int,
    message: str,
    *,
    code: str | None = None,
    param: str | None = None,
    error_type: str | None = None,
    headers: dict[str, str] | None = None,
    path: str | None = None,
) -> JSONResponse:
    """Render one error as a JSON response (in Anthropic's envelope on its routes: `path`)."""
    body = (
        anthropic_error_body(message, status_code=status_code)
        if path is not None and speaks_anthropic(path)
        else error_body(
            message, error_type=error_type or error_type_for(status_code), code=code, param=param
        )
    )
    # Says the error came from the gateway itself, not from an engine behind it.
    return JSONResponse(
        body, status_code=status_code, headers={**(headers or {}), "X-Error-Source": "gateway"}
    )


def _param_from_loc(loc: tuple[int | str, ...]) -> str | None:
    # FastAPI prefixes the location with where it came from ("body", "query", ...).
    parts = [str(p) for p in loc]
    if parts and parts[0] in {"body", "query", "path", "header", "cookie"}:
        parts = parts[1:]
    return ".".join(parts) or None


async def _gateway_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, GatewayError)
    return error_response(
        exc.status_code,
        exc.message,
        code=exc.code,
        param=exc.param,
        error_type=exc.error_type,
        headers=exc.headers,
        path=request.url.path,
    )


_METHODS = ("DELETE", "GET", "HEAD", "PATCH", "POST", "PUT")


def allowed_methods(request: Request) -> str:
    """Every method some route serves at this path. Starlette's 405 names only the methods of
    the first route that matched the path, and FastAPI registers a route per method (inside
    included routers), so each method is tried against the routes instead."""
    routes = request.app.router.routes
    allowed = [
        method
        for method in _METHODS
        if any(
            route.matches({**request.scope, "method": method})[0] is Match.FULL for route in routes
        )
    ]
    return ", ".join(allowed)


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    status = exc.status_code
    headers = dict(exc.headers or {})
    if status == 405:
        headers["Allow"] = allowed_methods(request) or headers.get("Allow", "")
    if isinstance(exc.detail, str) and exc.detail != HTTPStatus(status).phrase:
        message = exc.detail
    elif status == 404:
        message = "No such route; see /docs for the API."
    elif status == 405:
        message = "Method not allowed on this route."
    else:
        message = HTTPStatus(status).phrase
    code = {404: "not_found", 405: "method_not_allowed"}.get(status)
    return error_response(
        status, message, code=code, headers=headers or None, path=request.url.path
    )


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = exc.errors()
    first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
    param = _param_from_loc(tuple(first.get("loc", ())))
    reason = str(first.get("msg", "invalid value"))
    message = f"Invalid value for '{param}': {reason}" if param else f"Invalid request: {reason}"
    if len(errors) > 1:
        message += f" (and {len(errors) - 1} more error{'s' if len(errors) > 2 else ''})"
    return error_response(400, message, code="invalid_request", param=param, path=request.url.path)


def database_unavailable() -> GatewayError:
    """The 503 for a database that does not answer: temporary, so with Retry-After."""
    return GatewayError(
        503,
        "The database is unavailable; nothing was saved. Try again shortly.",
        code="database_unavailable",
        headers={"Retry-After": str(DATABASE_RETRY_AFTER_S)},
    )


async def _database_error(request: Request, exc: Exception) -> JSONResponse:
    """Every route's database errors: down is a 503, a refused NUL a 400, the rest a 500.

    Routes and services let database errors rise to here instead of wrapping their calls, so
    a route added later (or a login, which once answered 500) cannot miss it.
    """
    assert isinstance(exc, DBAPIError)
    if sqlstate(exc) in _TEXT_SQLSTATES:
        # The net under the schemas' NoNul rule (gateway.text), for a path that still sends one.
        return error_response(
            400,
            "The request has text the database cannot store (the NUL character, \\u0000).",
            code="invalid_text",
            path=request.url.path,
        )
    if is_database_down(exc):
        # The class name only: a database error's text can carry statement parameters. The
        # request id ties it to the request's log line (which names the route).
        log.warning("database_unavailable", error=type(exc).__name__)
        return await _gateway_error(request, database_unavailable())
    raise exc


HEADERS_TOO_LARGE_BODY = orjson.dumps(
    error_body(
        "Request headers are too large.",
        error_type="invalid_request_error",
        code="headers_too_large",
    )
)
INTERNAL_ERROR_MESSAGE = (
    "The gateway hit an internal error; the X-Request-ID header identifies it in the logs."
)
INTERNAL_ERROR_BODY = orjson.dumps(
    error_body(
        INTERNAL_ERROR_MESSAGE,
        error_type="server_error",
        code="internal_error",
    )
)


def error_bytes_for(path: str, openai_body: bytes, status_code: int, message: str) -> bytes:
    """A prebuilt OpenAI error body, or its Anthropic envelope on Anthropic's routes."""
    if speaks_anthropic(path):
        return orjson.dumps(anthropic_error_body(message, status_code=status_code))
    return openai_body


def install_error_handlers(app: FastAPI) -> None:
    """Register every handler once, so all errors share the envelope."""
    app.add_exception_handler(GatewayError, _gateway_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(DBAPIError, _database_error)
    # Unhandled exceptions are rendered by RequestContextMiddleware, which can still add the
    # request id header; Starlette's own last-resort handler sits outside every middleware.
