"""Error bodies in the shapes vLLM's OpenAI server uses."""

from __future__ import annotations

from http import HTTPStatus

import orjson


class SimulatorRequestError(Exception):
    """A request the simulated engine refuses, with vLLM's status, type and message."""

    def __init__(
        self,
        message: str,
        status: int = 400,
        err_type: str | None = None,
        *,
        param: str | None = None,
    ) -> None:
        """Build the error; ``err_type`` defaults to the type vLLM uses for ``status``."""
        super().__init__(message)
        self.message = message
        self.status = status
        self.err_type = err_type or error_type_for(status)
        self.param = param

    def body(self) -> bytes:
        """The JSON error body, e.g. ``{"object": "error", ..., "code": 400}``."""
        return error_body(self.message, self.status, self.err_type, self.param)

    def anthropic_body(self) -> bytes:
        """The same error as vLLM's Messages API translates it (``anthropic_error_body``)."""
        return anthropic_error_body(self.message, self.err_type)


class SimulatedConnectionDrop(Exception):
    """Raised inside the ASGI app to make the server close the connection mid-response."""


def error_type_for(status: int) -> str:
    """vLLM-style error type for an HTTP status, e.g. ``BadRequestError`` for 400."""
    try:
        phrase = HTTPStatus(status).phrase
    except ValueError:
        return "InternalServerError"
    special = {400: "BadRequestError", 404: "NotFoundError", 500: "InternalServerError"}
    if status in special:
        return special[status]
    return "".join(part.capitalize() for part in phrase.replace("-", " ").split()) + "Error"


def error_payload(
    message: str, status: int, err_type: str | None = None, param: str | None = None
) -> dict[str, object]:
    """vLLM's error object: ``object``, ``message``, ``type``, ``param`` and ``code``."""
    return {
        "object": "error",
        "message": message,
        "type": err_type or error_type_for(status),
        "param": param,
        "code": status,
    }


def error_body(
    message: str, status: int, err_type: str | None = None, param: str | None = None
) -> bytes:
    """The JSON-encoded vLLM error object."""
    return orjson.dumps(error_payload(message, status, err_type, param))


def anthropic_error_body(message: str, err_type: str) -> bytes:
    """An error of vLLM's Messages API: ``{"type": "error", "error": {"type", "message"}}``.

    vLLM translates its own errors into this shape and keeps their type (``BadRequestError``,
    ``NotFoundError``...), not Anthropic's names (``invalid_request_error``...).
    """
    return orjson.dumps({"type": "error", "error": {"type": err_type, "message": message}})


def sse_error_event(message: str, status: int = 500, err_type: str | None = None) -> bytes:
    """The SSE event vLLM sends when a stream fails: ``data: {"error": {...}}``."""
    return b'data: {"error":' + error_body(message, status, err_type) + b"}\n\n"
