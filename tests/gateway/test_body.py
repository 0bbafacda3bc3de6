"""Crafted JSON never gives a 500 (gateway/body.py check_json_shape, gateway/routing.py).

A field nested ~254 levels deep on /v1/* was a 500 (orjson cannot re-serialize it to relay
it), and integers wider than 64 bits were a 500 wherever a body is re-serialized. Every JSON
route now refuses a body nested deeper than MAX_JSON_DEPTH (400 json_too_deep, naming the
limit); an integer wider than 64 bits is read as a double by both parsers (orjson on /v1/*, the
route guard elsewhere), so nothing re-serialized can fail, and an integer field out of its range
is a 400 naming the field (`max_tokens` and `seed` on /v1/* and /api/chat, the token counts of an
import, ...).

Checked three ways: the walk itself; every JSON route of the app (read from its routes) with
each kind of crafted body, against a real gateway and a simulator engine; and a property-based
run (hypothesis) over those routes with generated bodies, which must find no 5xx. The run is
seeded and bounded; VCG_FUZZ_JSON_EXAMPLES=2000 VCG_FUZZ_SEED=7 make a longer or different one.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

from gateway.body import MAX_INTEGER, MIN_INTEGER, check_json_shape
from gateway.errors import GatewayError
from gateway.replicas.token import HEADER, fleet_token
from gateway.routing import GuardedRoute
from tests.helpers.proxy import Gateway, gateway, gateway_settings, sim_profile
from tests.helpers.routes import body_routes, concrete

ADMIN_PASSWORD = "body-Admin-passw0rd-3e8d1a"
DEPTH = 64  # MAX_JSON_DEPTH's default, which these gateways run with


def nested(depth: int, leaf: Any = "x", *, key: str | None = "a") -> Any:
    """`leaf` inside `depth` objects (`{key: ...}`) or, with key None, arrays."""
    value = leaf
    for _ in range(depth):
        value = [value] if key is None else {key: value}
    return value


def refusal(value: Any, max_depth: int = DEPTH) -> GatewayError | None:
    try:
        check_json_shape(value, max_depth=max_depth)
    except GatewayError as exc:
        return exc
    return None


# -- the walk ---------------------------------------------------------------------------------


def test_depth_is_counted_in_levels_of_objects_and_arrays() -> None:
    # The body itself is level 1: `depth` wrappers around a scalar are `depth` levels.
    assert refusal(nested(DEPTH)) is None
    assert refusal(nested(DEPTH, key=None)) is None
    for value in (nested(DEPTH + 1), nested(DEPTH + 1, key=None), nested(254)):
        error = refusal(value)
        assert error is not None
        assert (error.status_code, error.code) == (400, "json_too_deep")
        assert f"limit of {DEPTH} levels" in error.message
    # An empty container at the limit counts; a scalar does not.
    assert refusal(nested(DEPTH - 1, {})) is None
    assert refusal(nested(DEPTH, {})) is not None


def test_the_refused_field_is_named() -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": "hi", "n": 2**64}]}
    error = refusal(body)
    assert error is not None
    assert (error.code, error.param) == ("integer_out_of_range", "messages.0.n")
    assert "'messages.0.n'" in error.message
    deep = refusal({"tools": [nested(DEPTH)]})
    assert deep is not None
    assert deep.param is not None
    assert deep.param.startswith("tools.0.a.a")
    # A path of long client keys is shortened in the error, never echoed whole.
    long_keys = refusal(nested(DEPTH + 1, key="k" * 1000))
    assert long_keys is not None
    assert long_keys.param is not None
    assert len(long_keys.param) < 300
    assert len(long_keys.message) < 500


@pytest.mark.parametrize(
    "number",
    [MIN_INTEGER, MAX_INTEGER, 0, -1, 2**53 + 1, 1.5, 1e30, -1e300, float("nan"), float("inf")],
)
def test_numbers_orjson_can_write_pass(number: float) -> None:
    # Doubles of any size are written back as they are (NaN and infinity as null).
    assert refusal({"seed": number, "ids": [1, number]}) is None


@pytest.mark.parametrize("number", [MAX_INTEGER + 1, MIN_INTEGER - 1, 10**30, -(10**30)])
def test_integers_beyond_64_bits_are_refused(number: int) -> None:
    for body in ({"seed": number}, {"ids": [1, 2, number]}, {"a": {"b": [number]}}):
        error = refusal(body)
        assert error is not None, body
        assert (error.status_code, error.code) == (400, "integer_out_of_range")


def test_booleans_are_not_numbers() -> None:
    assert refusal({"stream": True, "list": [False, True]}) is None


# -- every JSON route, against a real gateway ---------------------------------------------------

# Bodies that pass each route's own checks, so that crafted fields are judged past them.
BASES: dict[str, dict[str, Any]] = {
    "/v1/chat/completions": {
        "model": "sim-a",
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 4,
    },
    "/v1/completions": {"model": "sim-a", "prompt": "hi", "max_tokens": 4},
    "/v1/embeddings": {"model": "sim-a", "input": "hi"},
    "/api/chat": {"message": "hi", "max_tokens": 4},
    "/api/chat/completions": {"message": "hi", "max_tokens": 4},
    "/api/conversations": {"title": "t"},
    "/api/conversations/import": {
        "version": 1,
        "conversation": {"title": "t"},
        "messages": [{"role": "user", "content": "hi"}],
    },
    "/api/keys": {"description": "d"},
    "/admin/api/keys": {"user_id": "admin", "description": "d"},
    "/admin/api/users": {"username": "fuzzed", "password": "fuzz-User-passw0rd-91"},
    "/api/auth/login": {"username": "admin", "password": "wrong-password"},
    "/admin/api/login": {"username": "admin", "password": "wrong-password"},
}
# The integer fields of the 500s, which must be a 400 naming the field.
INTEGER_FIELDS: dict[str, tuple[str, ...]] = {
    "/v1/chat/completions": ("max_tokens", "seed"),
    "/v1/completions": ("max_tokens", "seed"),
    "/v1/embeddings": ("seed",),
    "/api/chat": ("max_tokens", "seed"),
    "/api/chat/completions": ("max_tokens", "seed"),
}
# A logout would end the session the run uses; a switch or reload changes which engine runs
# (tests/gateway/models_api and tests/gateway/auth cover them, and the guard is the same). The
# transcription route takes a multipart form, not JSON (tests/gateway/proxy/test_engine_routes.py).
LEFT_OUT = {
    "/api/auth/logout",
    "/api/models/switch",
    "/api/models/reload",
    "/v1/audio/transcriptions",
}


def json_routes(gw: Gateway) -> list[tuple[str, str]]:
    """(METHOD, concrete path) of every route that takes a JSON body, from the app's routes."""
    found = []
    for method, path, route in body_routes(gw.app):
        if isinstance(route, GuardedRoute) and route.takes_body and path not in LEFT_OUT:
            found.append((method, concrete(path)))
    return found


@pytest.fixture
async def running() -> AsyncIterator[tuple[Gateway, dict[str, str]]]:
    profiles = {"sim-a": sim_profile("sim-a", "--test-routes")}
    values: dict[str, Any] = {
        "REQUIRE_AUTH": True,
        "ADMIN_PASSWORD": ADMIN_PASSWORD,
        "LOGIN_RATE_LIMIT_PER_MINUTE": 100_000,
        "ADMIN_RATE_LIMIT_PER_MINUTE": 100_000,
        "SESSION_RATE_LIMIT_PER_MINUTE": 100_000,
        "MAX_TOKENS_CAP": 16,
    }
    for tier in ("FREE", "STANDARD", "PREMIUM"):
        for window in ("PER_MINUTE", "PER_HOUR", "TOKENS_PER_MINUTE"):
            values[f"RATE_LIMIT_{tier}_{window}"] = 0
    async with gateway(gateway_settings(profiles, "sim-a", **values)) as gw:
        login = await gw.http.post(
            "/api/auth/login", json={"username": "admin", "password": ADMIN_PASSWORD}
        )
        assert login.status_code == 200, login.text
        yield gw, {"Authorization": f"Bearer {login.json()['access_token']}"}


def with_field(path: str, name: str, value: Any) -> bytes:
    """The route's base body with one more field, as JSON text (integers exact)."""
    return json.dumps({**BASES.get(path, {}), name: value}).encode()


def _code(response: httpx.Response, path: str) -> str | None:
    """The error's code; on Anthropic's routes (whose envelope has none) the gateway's
    refusals are named by their message, the depth limit's included."""
    body = response.json()
    if path.startswith("/v1/messages"):
        assert body["type"] == "error", body
        assert body["error"]["type"] == "invalid_request_error", body
        return "json_too_deep" if "levels" in body["error"]["message"] else None
    code = body["error"]["code"]
    return code if isinstance(code, str) else None


async def test_every_json_route_refuses_deep_nesting_and_bounds_integers(
    running: tuple[Gateway, dict[str, str]],
) -> None:
    gw, auth = running
    routes = json_routes(gw)
    assert ("POST", "/v1/chat/completions") in routes
    assert ("POST", "/api/chat") in routes
    # The replicas' fleet routes take the fleet token; every other route the admin's.
    fleet = {HEADER: fleet_token(gw.app.state.settings)}
    headers = {**auth, **fleet, "Content-Type": "application/json"}
    for method, path in routes:
        # 255 levels: orjson parsed it but could not re-serialize it (the 500 of the issue).
        deep = await gw.http.request(
            method, path, content=with_field(path, "extra", nested(254)), headers=headers
        )
        assert deep.status_code == 400, (method, path, deep.text)
        assert _code(deep, path) == "json_too_deep", (method, path, deep.text)
        assert f"{DEPTH} levels" in deep.json()["error"]["message"], deep.text
        # Past orjson's own limit of 1024 levels: still named as the gateway's limit.
        # (written out by hand: Python's json module cannot nest that deep either)
        base = with_field(path, "extra", 0)
        deep_text = b'{"a":' * 2000 + b"0" + b"}" * 2000
        deeper = await gw.http.request(
            method, path, content=base[: -len(b"0}")] + deep_text + b"}", headers=headers
        )
        assert deeper.status_code == 400, (method, path, deeper.text)
        assert _code(deeper, path) == "json_too_deep", (method, path, deeper.text)
        for name in ("max_tokens", "seed"):
            wide = await gw.http.request(
                method, path, content=with_field(path, name, 2**64), headers=headers
            )
            label = f"{method} {path} {name}=2**64"
            assert wide.status_code < 500, (label, wide.text)
            if name in INTEGER_FIELDS.get(path, ()):
                assert wide.status_code == 400, (label, wide.text)
                assert wide.json()["error"]["param"] == name, (label, wide.text)
        # Nesting within the limit is not refused for its depth.
        within = await gw.http.request(
            method, path, content=with_field(path, "extra", nested(DEPTH - 2)), headers=headers
        )
        assert within.status_code < 500, (method, path, within.text)
        assert within.json().get("error", {}).get("code") != "json_too_deep", within.text
    # The engine still answers after all of it.
    fine = await gw.http.post(
        "/v1/chat/completions", json=BASES["/v1/chat/completions"], headers=auth
    )
    assert fine.status_code == 200, fine.text


# -- the property: no generated body gives a 5xx -----------------------------------------------

SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats()
    | st.text(max_size=12)
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=12,
)
# Depths around both limits: MAX_JSON_DEPTH (64) and orjson's 254.
DEEP = st.builds(
    nested,
    st.integers(min_value=0, max_value=70) | st.integers(min_value=240, max_value=400),
    VALUES,
    key=st.sampled_from([None, "a", "messages"]),
)
WIDE = st.integers(min_value=2**63, max_value=2**200) | st.integers(
    min_value=-(2**200), max_value=-(2**63)
)
CRAFTED = st.one_of(DEEP, WIDE, VALUES)
NAMES = st.sampled_from(
    ["extra", "metadata", "max_tokens", "seed", "n", "temperature", "messages", "stop", "input"]
) | st.text(max_size=8)


@st.composite
def requests(draw: st.DrawFn, routes: list[tuple[str, str]]) -> tuple[str, str, bytes]:
    """A route and a body: its base with a field added or replaced, or a crafted value alone."""
    method, path = draw(st.sampled_from(routes))
    base = dict(BASES.get(path, {}))
    value = draw(CRAFTED)
    shape = draw(st.sampled_from(["add", "add", "replace", "alone"]))
    body: Any = value
    if shape == "add" or (shape == "replace" and not base):
        base[draw(NAMES)] = value
        body = base
    elif shape == "replace":
        base[draw(st.sampled_from(sorted(base)))] = value
        body = base
    return method, path, json.dumps(body).encode()


def run_property(url: str, headers: dict[str, str], routes: list[tuple[str, str]]) -> int:
    """The hypothesis run (blocking: it runs on a thread beside the served gateway)."""
    sent = 0
    examples = int(os.environ.get("VCG_FUZZ_JSON_EXAMPLES", "800"))

    with httpx.Client(base_url=url, timeout=30) as client:

        @seed(int(os.environ.get("VCG_FUZZ_SEED", "20261207")))
        @settings(
            max_examples=examples,
            deadline=None,
            database=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        )
        @given(requests(routes))
        def no_server_error(request: tuple[str, str, bytes]) -> None:
            nonlocal sent
            method, path, body = request
            response = client.request(
                method, path, content=body, headers={**headers, "Content-Type": "application/json"}
            )
            sent += 1
            assert response.status_code < 500, (method, path, body[:300], response.text[:500])

        no_server_error()
    return sent


async def test_generated_json_never_gives_a_server_error(
    running: tuple[Gateway, dict[str, str]],
) -> None:
    gw, auth = running
    routes = json_routes(gw)
    sent = await asyncio.to_thread(run_property, gw.url, auth, routes)
    assert sent >= min(100, int(os.environ.get("VCG_FUZZ_JSON_EXAMPLES", "800")))
