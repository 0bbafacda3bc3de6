"""The app's routes as the tests enumerate them: every leaf route, (METHOD, path) keys, concrete
paths for templates. Tests that must cover every route read them from here, so a new route is
covered without anyone listing it."""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterable, Iterator
from typing import Any

from fastapi import FastAPI
from fastapi.routing import APIRoute

Key = tuple[str, str]  # (METHOD, path template)

DUMMY_PATH_PARAMS = {
    "user_id": str(uuid.UUID(int=1)),
    "key_id": str(uuid.UUID(int=2)),
    "job_id": "deadbeef",
    "profile_id": "no-such-profile",
    "model_name": "no-such-model",
    "response_id": "resp_0123456789abcdef",
    "conversation_id": str(uuid.UUID(int=3)),
    "asset": "ui.css",
    "file": "swagger-ui.css",
}
# Methods whose requests carry a body.
BODY_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})


def flat_routes(routes: Iterable[Any]) -> Iterator[Any]:
    """Every leaf route; FastAPI >= 0.16x keeps included routers as one `_IncludedRouter` each,
    whose leaves are route contexts (`original_route` is the route the router built)."""
    for route in routes:
        contexts = getattr(route, "effective_route_contexts", None)
        if callable(contexts):
            yield from flat_routes(contexts())
            continue
        sub = getattr(route, "routes", None)
        if sub is not None and getattr(route, "methods", None) is None:
            # A Mount (static files, a sub-app): its routes must be classified too.
            raise AssertionError(
                f"mounted app at {getattr(route, 'path', route)!r}: extend the inventory to it"
            )
        yield route


def inventory(app: FastAPI) -> set[Key]:
    """(METHOD, path) for every route of the app."""
    found: set[Key] = set()
    for route in flat_routes(app.routes):
        path = getattr(route, "path", None)
        methods = getattr(route, "methods", None)
        assert isinstance(path, str), f"route without a path: {route!r}"
        assert methods, f"route without methods: {route!r}"
        found.update((method, path) for method in methods)
    return found


def original_route(route: Any) -> Any:
    """The route object a router built, behind an included router's context."""
    return getattr(route, "original_route", route)


def body_routes(app: FastAPI) -> list[tuple[str, str, APIRoute]]:
    """(METHOD, path, route) for every route that takes a request body: a body method, or a
    body parameter FastAPI parses (whatever the method)."""
    found = []
    for leaf in flat_routes(app.routes):
        route = original_route(leaf)
        methods = set(getattr(leaf, "methods", None) or ())
        takes_body = getattr(route, "body_field", None) is not None
        for method in sorted(methods):
            if method in BODY_METHODS or takes_body:
                found.append((method, str(leaf.path), route))
    return found


def concrete(path: str) -> str:
    """The template with every parameter filled with a dummy value."""

    def fill(match: re.Match[str]) -> str:
        name = match.group(1).split(":", 1)[0]
        assert name in DUMMY_PATH_PARAMS, f"add a dummy value for path parameter {name!r}"
        return DUMMY_PATH_PARAMS[name]

    return re.sub(r"\{([^}]+)\}", fill, path)
