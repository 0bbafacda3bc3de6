"""Usage of proxied requests: recorded off the request path with the engine's token counts,
reported to admins (everyone's) and users (their own), and written out at shutdown."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from sqlalchemy import select

from gateway.db import create_engine, create_session_factory
from gateway.usage.models import UsageRecord
from tests.helpers.polling import eventually
from tests.helpers.proxy import sim_profile
from tests.helpers.quota import (
    ADMIN_PASSWORD,
    bearer,
    chat,
    create_key,
    create_user,
    error_code,
    login,
    quota_gateway,
    quota_settings,
    sse_events,
)

pytestmark = pytest.mark.postgres

# A small context window: a request for more tokens than fit is an engine error (400).
PROFILES = {"sim-a": sim_profile("sim-a", "--max-model-len", "256")}


async def _rows(database_url: str) -> list[UsageRecord]:
    engine = create_engine(database_url, pool_size=1)
    try:
        async with create_session_factory(engine)() as session:
            return list(await session.scalars(select(UsageRecord).order_by(UsageRecord.id)))
    finally:
        await engine.dispose()


def _row(record: UsageRecord) -> tuple[Any, ...]:
    return (
        record.user_id and str(record.user_id),
        record.api_key_id and str(record.api_key_id),
        record.endpoint,
        record.model,
        record.status_code,
        record.prompt_tokens,
        record.completion_tokens,
        record.route,
    )


async def _report(http: httpx.AsyncClient, path: str, token: str) -> dict[str, Any]:
    reply = await http.get(path, headers=bearer(token))
    assert reply.status_code == 200, reply.text
    return dict(reply.json())


async def test_requests_are_reported_with_their_owner_key_model_and_tokens(pg_url: str) -> None:
    settings = quota_settings(pg_url, profiles=PROFILES, USAGE_FLUSH_INTERVAL_S=0.1)
    async with quota_gateway(settings) as gw:
        http = gw.http
        alice = await create_user(http, "alice")
        bob = await create_user(http, "bob")
        key = await create_key(http, "alice")
        alice_token, bob_token = await login(http, "alice"), await login(http, "bob")
        admin_token = await login(http, "admin", ADMIN_PASSWORD)

        plain = await chat(http, bearer(key["key"]), max_tokens=5)
        assert plain.status_code == 200, plain.text
        prompt = plain.json()["usage"]["prompt_tokens"]
        assert prompt > 0
        streamed = await chat(http, bearer(key["key"]), max_tokens=7, stream=True)
        assert streamed.status_code == 200, streamed.text
        assert sse_events(streamed)[-1] == "[DONE]"
        failed = await chat(http, bearer(key["key"]), max_tokens=1000)
        assert failed.status_code == 400, failed.text
        assert failed.headers["x-error-source"] == "upstream"
        by_bob = await chat(http, bearer(bob_token), model="current", max_tokens=3)
        assert by_bob.status_code == 200, by_bob.text
        # Refused before reaching an engine: not usage.
        assert error_code(await chat(http, bearer(key["key"]), model="nope")) == "model_not_found"
        assert (await chat(http, {})).status_code == 401

        async def everything() -> dict[str, Any] | None:
            report = await _report(http, "/admin/api/usage?days=1", admin_token)
            return report if report["totals"]["requests"] >= 4 else None

        report: dict[str, Any] = await eventually(everything, timeout_s=10)
        totals = report["totals"]
        assert (totals["requests"], totals["errors"], totals["cloud_requests"]) == (4, 1, 0)
        assert (totals["prompt_tokens"], totals["completion_tokens"]) == (3 * prompt, 5 + 7 + 3)
        assert {u["username"]: u["requests"] for u in report["by_user"]} == {"alice": 3, "bob": 1}
        assert {k["key_id"]: k["requests"] for k in report["by_key"]} == {key["id"]: 3, None: 1}
        assert {k["key_id"]: k["prefix"] for k in report["by_key"]} == {
            key["id"]: key["prefix"], None: None,
        }  # fmt: skip
        assert {m["model"]: m["requests"] for m in report["by_model"]} == {"sim-a": 4}
        assert report["by_day"][-1]["requests"] == 4

        rows = {record.request_id: _row(record) for record in await _rows(pg_url)}
        assert rows == {
            plain.headers["x-request-id"]: (
                alice["id"], key["id"], "chat", "sim-a", 200, prompt, 5, "local"
            ),
            streamed.headers["x-request-id"]: (
                alice["id"], key["id"], "chat", "sim-a", 200, prompt, 7, "local"
            ),
            failed.headers["x-request-id"]: (
                alice["id"], key["id"], "chat", "sim-a", 400, 0, 0, "local"
            ),
            by_bob.headers["x-request-id"]: (
                bob["id"], None, "chat", "sim-a", 200, prompt, 3, "local"
            ),
        }  # fmt: skip

        # Each user sees their own requests only, whichever credential they use.
        for credential in (key["key"], alice_token):
            mine = await _report(http, "/api/usage?days=1", credential)
            assert mine["totals"]["requests"] == 3
            assert [u["username"] for u in mine["by_user"]] == ["alice"]
            assert mine["totals"]["completion_tokens"] == 12
        theirs = await _report(http, "/api/usage?days=1", bob_token)
        assert theirs["totals"]["requests"] == 1
        assert [(u["username"], u["completion_tokens"]) for u in theirs["by_user"]] == [("bob", 3)]
        assert [k["key_id"] for k in theirs["by_key"]] == [None]
        forbidden = await http.get("/admin/api/usage?days=1", headers=bearer(alice_token))
        assert forbidden.status_code == 403


async def test_usage_still_buffered_at_shutdown_is_written(pg_url: str) -> None:
    # Nothing is flushed on a timer during the test: only the shutdown can write the rows.
    settings = quota_settings(
        pg_url, profiles=PROFILES, USAGE_FLUSH_INTERVAL_S=3600, USAGE_BATCH_SIZE=1000
    )
    async with quota_gateway(settings) as gw:
        http = gw.http
        key = await create_key(http, "late-team")
        replies = [
            await chat(http, bearer(key["key"]), max_tokens=4),
            await chat(http, bearer(key["key"]), max_tokens=6, stream=True),
            await chat(http, bearer(key["key"]), max_tokens=1000),
        ]
        assert [r.status_code for r in replies] == [200, 200, 400]
        recorder = gw.app.state.resources.usage

        async def all_buffered() -> bool:
            return bool(recorder.pending == 3)

        await eventually(all_buffered)
        assert await _rows(pg_url) == []
    rows = {record.request_id: _row(record) for record in await _rows(pg_url)}
    assert [rows.get(r.headers["x-request-id"]) for r in replies] == [
        (key["user_id"], key["id"], "chat", "sim-a", status, prompt, completion, "local")
        for status, prompt, completion in (
            (200, replies[0].json()["usage"]["prompt_tokens"], 4),
            (200, replies[0].json()["usage"]["prompt_tokens"], 6),
            (400, 0, 0),
        )
    ]
    assert len(rows) == 3
