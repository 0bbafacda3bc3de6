"""Structured logs: JSON in production, one line per request, bound request id, no secrets."""

from __future__ import annotations

import json

import pytest
from fastapi import FastAPI

from gateway.logging import get_logger
from tests.helpers.app import make_settings, running_app


def _json_lines(text: str) -> list[dict[str, object]]:
    lines = []
    for raw in text.splitlines():
        if raw.startswith("{"):
            lines.append(json.loads(raw))
    return lines


async def test_production_logs_are_json_with_request_id(
    sqlite_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    async with running_app(make_settings(DATABASE_URL=sqlite_url)) as (_, client):
        await client.get("/health", headers={"X-Request-ID": "log-test-42"})
    events = _json_lines(capsys.readouterr().err)
    requests = [e for e in events if e.get("event") == "request"]
    assert len(requests) == 1
    line = requests[0]
    assert line["request_id"] == "log-test-42"
    assert line["path"] == "/health"
    assert line["status"] == 200
    assert isinstance(line["duration_ms"], float)
    assert {"timestamp", "level"} <= set(line)


async def test_request_id_is_bound_to_lines_logged_inside_the_request(
    sqlite_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    inner = get_logger("tests.inner")

    def routes(app: FastAPI) -> None:
        @app.get("/_test/log")
        async def log_something() -> dict[str, bool]:
            inner.info("inside_handler", password="hunter2", api_key="sk-secret-value")
            return {"ok": True}

    async with running_app(make_settings(DATABASE_URL=sqlite_url), routes) as (_, client):
        await client.get("/_test/log", headers={"X-Request-ID": "bound-7"})
    err = capsys.readouterr().err
    inside = [e for e in _json_lines(err) if e.get("event") == "inside_handler"]
    assert inside
    assert inside[0]["request_id"] == "bound-7"
    assert "hunter2" not in err
    assert "sk-secret-value" not in err
    assert inside[0]["password"] == "[redacted]"


async def test_development_logs_are_readable_not_json(
    sqlite_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    settings = make_settings(
        DATABASE_URL=sqlite_url, ENVIRONMENT="development", LOG_FORMAT="auto", JWT_SECRET=None
    )
    async with running_app(settings) as (_, client):
        await client.get("/health")
    err = capsys.readouterr().err
    request_lines = [line for line in err.splitlines() if "request" in line and "/health" in line]
    assert request_lines
    assert not request_lines[0].lstrip().startswith("{")
    assert "jwt_secret_generated" in err
