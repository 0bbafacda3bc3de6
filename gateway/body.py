"""Request bodies: read under a size cap, whether or not they declare their length; parsed
JSON bounded in nesting depth and integer size.

Every route reads its body through `read_capped_body` (gateway.routing does it for the routes
FastAPI would parse; the OpenAI and login routes call it themselves), and every JSON body is
checked by `check_json_shape` before anything acts on it or re-serializes it.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from starlette.requests import Request

from gateway.errors import GatewayError


def body_too_large(limit: int, *, declared: int | None = None) -> GatewayError:
    """The 413 for a body over `limit` bytes (as declared, or as counted so far)."""
    if declared is not None:
        message = f"Request body is {declared} bytes; the limit is {limit}."
    else:
        message = f"Request body is over the limit of {limit} bytes."
    return GatewayError(413, message, code="body_too_large")


async def read_capped_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 once it is known to exceed `limit` bytes.

    A declared Content-Length over the cap is refused before anything is read; a chunked body
    (no Content-Length) or one longer than declared is counted as it arrives and refused as soon
    as the count passes the cap, so the gateway never holds more than about `limit` bytes of it.
    """
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise body_too_large(limit, declared=int(declared))
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise body_too_large(limit)
        if chunk:  # Starlette ends the stream with an empty chunk
            chunks.append(chunk)
    # One chunk (the usual case) is returned as is: join does not copy a lone bytes object.
    return b"".join(chunks)


# The integers a JSON body may hold: what orjson serializes (it refuses anything wider, which
# was a 500 when a body was relayed or stored) and what a 64-bit engine field can take. Both
# parsers read a wider integer as the nearest double (orjson on its own, `parse_json` in
# gateway.routing like it), and each integer field checks its own bounds; the walk below is
# the net under that, for a body that still holds one.
MIN_INTEGER = -(2**63)
MAX_INTEGER = 2**64 - 1

_SHOWN_PATH_CHARS = 200


class _Refused(Exception):
    """Where the walk stopped (the path is collected on the way out) and why."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason
        self.path: list[str | int] = []


def _walk(value: object, depth: int, max_depth: int) -> None:
    if isinstance(value, dict):
        items: Iterable[tuple[Any, object]] = value.items()
    elif isinstance(value, list):
        items = enumerate(value)
    elif type(value) is int:  # not bool
        if not MIN_INTEGER <= value <= MAX_INTEGER:
            raise _Refused("integer")
        return
    else:
        return
    if depth > max_depth:
        raise _Refused("depth")
    for key, item in items:
        # Scalars inline: a long list of token ids should not cost a call per item.
        if type(item) is int:
            if MIN_INTEGER <= item <= MAX_INTEGER:
                continue
        elif type(item) is not dict and type(item) is not list:
            continue
        try:
            _walk(item, depth + 1, max_depth)
        except _Refused as refused:
            refused.path.append(key)
            raise


def too_deep(max_depth: int, param: str | None = None) -> GatewayError:
    """400 json_too_deep: the body (or the field `param`) nests past the limit. Also what a
    parser's own nesting limit becomes (orjson's 1024 levels, the standard library's recursion
    limit), so a client always hears the gateway's limit."""
    where = f"'{param}'" if param else "The body"
    return GatewayError(
        400,
        f"{where} nests deeper than the limit of {max_depth} levels of objects and arrays.",
        code="json_too_deep",
        param=param,
    )


def orjson_refusal(exc: Exception, max_depth: int) -> GatewayError:
    """The 400 for a body orjson could not parse: json_too_deep past its nesting limit,
    invalid_json (with orjson's reason) otherwise."""
    if str(exc).startswith("depth limit exceeded"):
        return too_deep(max_depth)
    return GatewayError(400, f"Request body is not valid JSON: {exc}", code="invalid_json")


def check_json_shape(value: object, *, max_depth: int) -> None:
    """Refuse (400, naming the field) a parsed JSON body that nests objects and arrays deeper
    than `max_depth` levels (the body itself is level 1) or holds an integer outside
    MIN_INTEGER..MAX_INTEGER.

    Both were 500s: orjson cannot re-serialize more than 254 levels or a wider integer, and the
    gateway re-serializes what it relays and stores.
    """
    try:
        _walk(value, 1, max_depth)
    except _Refused as refused:
        param = ".".join(str(part) for part in reversed(refused.path)) or None
        if param is not None and len(param) > _SHOWN_PATH_CHARS:
            # The keys are the client's: a deep path of long ones would make a huge error.
            half = _SHOWN_PATH_CHARS // 2
            param = f"{param[:half]}...{param[-half:]}"
        where = f"'{param}'" if param else "The body"
        if refused.reason == "depth":
            raise too_deep(max_depth, param) from None
        raise GatewayError(
            400,
            f"{where} is an integer outside the range this gateway takes "
            f"({MIN_INTEGER} to {MAX_INTEGER}).",
            code="integer_out_of_range",
            param=param,
        ) from None
