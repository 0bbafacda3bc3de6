"""Every error the gateway produces has one OpenAI-shaped body and carries the request id."""

from __future__ import annotations

import re

from fastapi import FastAPI
from pydantic import BaseModel, Field

from tests.helpers.app import make_settings, running_app

ENVELOPE_KEYS = {"message", "type", "param", "code"}


class _Body(BaseModel):
    name: str
    count: int = Field(ge=0)


def _test_routes(app: FastAPI) -> None:
    @app.post("/_test/echo")
    async def echo(body: _Body) -> dict[str, object]:
        return body.model_dump()

    @app.get("/_test/boom")
    async def boom() -> dict[str, str]:
        raise RuntimeError("kaboom with internals: password=hunter2")


def _assert_envelope(body: dict[str, object]) -> dict[str, object]:
    assert set(body) == {"error"}
    error = body["error"]
    assert isinstance(error, dict)
    assert set(error) == ENVELOPE_KEYS
    assert isinstance(error["message"], str)
    assert error["message"]
    return error


async def test_unknown_route_is_404_envelope(sqlite_url: str) -> None:
    async with running_app(make_settings(DATABASE_URL=sqlite_url)) as (_, client):
        response = await client.get("/no/such/route")
    assert response.status_code == 404
    error = _assert_envelope(response.json())
    assert error["type"] == "not_found_error"
    assert error["code"] == "not_found"


async def test_wrong_method_is_405_envelope(sqlite_url: str) -> None:
    async with running_app(make_settings(DATABASE_URL=sqlite_url)) as (_, client):
        response = await client.delete("/health")
    assert response.status_code == 405
    error = _assert_envelope(response.json())
    assert error["code"] == "method_not_allowed"
    assert "GET" in response.headers["allow"]


async def test_validation_error_names_the_field(sqlite_url: str) -> None:
    settings = make_settings(DATABASE_URL=sqlite_url)
    async with running_app(settings, _test_routes) as (_, client):
        bad_count = await client.post("/_test/echo", json={"name": "x", "count": -1})
        missing = await client.post("/_test/echo", json={"count": 1})
        not_json = await client.post(
            "/_test/echo", content=b"{nope", headers={"content-type": "application/json"}
        )
    assert bad_count.status_code == 400
    error = _assert_envelope(bad_count.json())
    assert error["param"] == "count"
    assert "count" in str(error["message"])
    assert error["type"] == "invalid_request_error"
    assert _assert_envelope(missing.json())["param"] == "name"
    assert not_json.status_code == 400
    _assert_envelope(not_json.json())


async def test_internal_error_is_500_envelope_without_internals(sqlite_url: str) -> None:
    settings = make_settings(DATABASE_URL=sqlite_url)
    async with running_app(settings, _test_routes) as (_, client):
        response = await client.get("/_test/boom", headers={"X-Request-ID": "req-boom-1"})
    assert response.status_code == 500
    error = _assert_envelope(response.json())
    assert error["type"] == "server_error"
    assert "kaboom" not in response.text
    assert "hunter2" not in response.text
    assert response.headers["x-request-id"] == "req-boom-1"


async def test_request_id_is_echoed_or_generated(sqlite_url: str) -> None:
    async with running_app(make_settings(DATABASE_URL=sqlite_url)) as (_, client):
        echoed = await client.get("/health", headers={"X-Request-ID": "abc-123"})
        generated = await client.get("/health")
        unsafe = await client.get("/health", headers={"X-Request-ID": "evil\tvalue" + "x" * 200})
    assert echoed.headers["x-request-id"] == "abc-123"
    assert re.fullmatch(r"[0-9a-f]{32}", generated.headers["x-request-id"])
    assert re.fullmatch(r"[0-9a-f]{32}", unsafe.headers["x-request-id"])
