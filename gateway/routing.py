"""The route class of every router: a request body is capped, read only after the caller is
known, and bounded in shape before FastAPI parses it.

FastAPI reads and parses a pydantic body parameter before it runs any dependency, so a route
that takes `body: Model` and `PrincipalDep` parsed a body of any size from anyone before it
refused them (a 300 MB body sent without credentials took a gateway from 190 MB to 1 GB).
`GuardedRoute` runs in front of FastAPI's handler:

1. a declared Content-Length over the route's cap is a 413 before anything is read;
2. the receive channel is counted, so however the route reads, it gets a 413 past the cap;
3. on routes FastAPI parses, the credential dependency (`get_admin` or `get_principal`, when the
   route depends on one) runs first: a caller without credentials is refused before the body
   is read; the body is then read through `read_capped_body`, parsed once and checked by
   `check_json_shape` (depth, integer size), and handed to FastAPI already parsed.

Routes that read their body themselves (the OpenAI routes, the logins) declare it with
`body_limit`, authenticate and call `read_capped_body` on their own; the cap and the counting
apply to them all the same. A body parameter's route has the cap MAX_BODY_BYTES unless its
endpoint declares another with `body_limit`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Awaitable, Callable, Coroutine
from enum import StrEnum
from typing import Any, TypeVar

from fastapi.dependencies.models import Dependant
from fastapi.routing import APIRoute
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Message, Receive

from gateway.body import (
    MAX_INTEGER,
    MIN_INTEGER,
    body_too_large,
    check_json_shape,
    read_capped_body,
    too_deep,
)
from gateway.deps import core_resources, get_admin, get_principal
from gateway.errors import GatewayError
from gateway.settings import Settings

# A login, a refresh or logout token: a few short strings; anything bigger is not one.
CREDENTIALS_BODY_BYTES = 16 * 1024


class BodyLimit(StrEnum):
    """Which cap a route's body has."""

    DEFAULT = "default"  # MAX_BODY_BYTES
    CREDENTIALS = "credentials"  # CREDENTIALS_BODY_BYTES: the routes that take credentials
    IMPORT = "import"  # MAX_IMPORT_BYTES: a whole exported conversation
    AUDIO = "audio"  # MAX_AUDIO_BYTES: an audio file to transcribe


Endpoint = TypeVar("Endpoint", bound=Callable[..., Any])
_LIMITS: dict[Callable[..., Any], BodyLimit] = {}


def body_limit(limit: BodyLimit) -> Callable[[Endpoint], Endpoint]:
    """Declare an endpoint's body cap. Needed for a cap other than MAX_BODY_BYTES, and on every
    endpoint that reads its body itself (no body parameter), which says that its route takes
    one. Goes under the route decorator, which reads it when it builds the route."""

    def mark(endpoint: Endpoint) -> Endpoint:
        _LIMITS[endpoint] = limit
        return endpoint

    return mark


def limit_bytes(limit: BodyLimit, settings: Settings) -> int:
    """The cap in bytes of a `BodyLimit` under these settings."""
    if limit is BodyLimit.CREDENTIALS:
        return CREDENTIALS_BODY_BYTES
    if limit is BodyLimit.IMPORT:
        return settings.MAX_IMPORT_BYTES
    if limit is BodyLimit.AUDIO:
        return settings.MAX_AUDIO_BYTES
    return settings.MAX_BODY_BYTES


def _calls(dependant: Dependant) -> set[Callable[..., Any]]:
    found: set[Callable[..., Any]] = set()
    for sub in dependant.dependencies:
        if sub.call is not None:
            found.add(sub.call)
        found |= _calls(sub)
    return found


CredentialCheck = Callable[[Request], Awaitable[object]]
# Other credential checks routes may depend on (from headers alone, like get_admin): the
# replicas' fleet token.
_HEADER_CREDENTIALS: list[CredentialCheck] = []


def header_credential(check: CredentialCheck) -> CredentialCheck:
    """Register a dependency that knows the caller from its headers alone, so that the body
    guard runs it before the body is read."""
    _HEADER_CREDENTIALS.append(check)
    return check


def credential_dependency(dependant: Dependant) -> CredentialCheck | None:
    """The dependency that resolves this route's caller from its headers (the admin check when
    the route has one), or None for a route without one."""
    calls = _calls(dependant)
    if get_admin in calls:
        return get_admin
    if get_principal in calls:
        return get_principal
    return next((check for check in _HEADER_CREDENTIALS if check in calls), None)


def _counted(receive: Receive, limit: int) -> Receive:
    received = 0

    async def counted() -> Message:
        nonlocal received
        message = await receive()
        if message["type"] == "http.request":
            received += len(message.get("body", b""))
            if received > limit:
                raise body_too_large(limit)
        return message

    return counted


def _is_json(content_type: str | None) -> bool:
    # The media types FastAPI parses as JSON (application/json and application/*+json).
    media = (content_type or "").split(";", 1)[0].strip().lower()
    return media == "application/json" or (
        media.startswith("application/") and media.endswith("+json")
    )


def _read_integer(text: str) -> int | float:
    # As orjson reads the OpenAI routes' bodies: an integer wider than 64 bits becomes the
    # nearest double, which every later step can write again (orjson cannot write the int: a
    # 500), and an integer field's own bounds then refuse it, naming the field.
    if len(text) <= 20:  # 2**64 has 20 digits
        value = int(text)
        if MIN_INTEGER <= value <= MAX_INTEGER:
            return value
    number = float(text)
    if math.isinf(number):
        raise ValueError("an integer beyond the range of a double")
    return number


def parse_json(raw: bytes, *, max_depth: int) -> Any:
    """A JSON body parsed as FastAPI would parse it (the standard library), except that an
    integer wider than 64 bits is read as a double, as orjson reads it; then checked by
    `check_json_shape`. A 400 naming the problem when it is not valid."""
    try:
        value = json.loads(raw, parse_int=_read_integer)
    except RecursionError:
        raise too_deep(max_depth) from None
    except json.JSONDecodeError as exc:
        raise GatewayError(
            400, f"Request body is not valid JSON: {exc}", code="invalid_json"
        ) from None
    except UnicodeDecodeError:
        raise GatewayError(
            400, "Request body is not valid JSON: it is not UTF-8 text.", code="invalid_json"
        ) from None
    except ValueError:  # the one left: an integer beyond the range of a double
        raise GatewayError(
            400,
            "Request body has an integer too large to read (beyond the range of a double).",
            code="invalid_json",
        ) from None
    check_json_shape(value, max_depth=max_depth)
    return value


class GuardedRoute(APIRoute):
    """An APIRoute whose body is capped, read after the caller is known and checked in shape
    (the module docstring says how). Every router with routes that take a body uses it."""

    @property
    def body_limit(self) -> BodyLimit:
        """The cap of this route's body."""
        return _LIMITS.get(self.endpoint, BodyLimit.DEFAULT)

    @property
    def takes_body(self) -> bool:
        """Whether the route reads a body: a body parameter, or an endpoint that declared it
        reads one itself (`body_limit`)."""
        return self.body_field is not None or self.endpoint in _LIMITS

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        """FastAPI's handler, behind the body guard."""
        handler = super().get_route_handler()
        limit = self.body_limit
        if self.body_field is None:
            # The endpoint reads its own body (the /v1/* routes, the logins) through
            # read_capped_body with this same cap, after it knows the caller: only a declared
            # length over the cap is refused here, before anything; counting the stream as well
            # would count every body twice on the proxy's hot path.

            async def declared_only(request: Request) -> Response:
                declared = request.headers.get("content-length", "")
                if declared.isdigit():
                    cap = limit_bytes(limit, core_resources(request).settings)
                    if int(declared) > cap:
                        raise body_too_large(cap, declared=int(declared))
                return await handler(request)

            return declared_only
        credentials = credential_dependency(self.dependant)

        async def guarded(request: Request) -> Response:
            settings = core_resources(request).settings
            cap = limit_bytes(limit, settings)
            declared = request.headers.get("content-length", "")
            if declared.isdigit() and int(declared) > cap:
                raise body_too_large(cap, declared=int(declared))
            request = Request(request.scope, _counted(request.receive, cap))
            if credentials is not None:
                # Resolved once: the dependency later returns what this found.
                await credentials(request)
            raw = await read_capped_body(request, cap)
            # Starlette's own caches of the body and its JSON, which FastAPI's handler
            # reads instead of the (now consumed) receive channel.
            request._body = raw
            if raw and _is_json(request.headers.get("content-type")):
                request._json = parse_json(raw, max_depth=settings.MAX_JSON_DEPTH)
            return await handler(request)

        return guarded
