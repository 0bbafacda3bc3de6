"""Reading a request body under a size cap, whether or not it declares its length (the OpenAI
routes and the login routes, which parse their bodies themselves)."""

from __future__ import annotations

from starlette.requests import Request

from gateway.errors import GatewayError


def _too_large(message: str) -> GatewayError:
    return GatewayError(413, message, code="body_too_large")


async def read_capped_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 once it is known to exceed `limit` bytes.

    A declared Content-Length over the cap is refused before anything is read; a chunked body
    (no Content-Length) or one longer than declared is counted as it arrives and refused as soon
    as the count passes the cap, so the gateway never holds more than about `limit` bytes of it.
    """
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise _too_large(f"Request body is {declared} bytes; the limit is {limit}.")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _too_large(f"Request body is over the limit of {limit} bytes.")
        if chunk:  # Starlette ends the stream with an empty chunk
            chunks.append(chunk)
    # One chunk (the usual case) is returned as is: join does not copy a lone bytes object.
    return b"".join(chunks)
