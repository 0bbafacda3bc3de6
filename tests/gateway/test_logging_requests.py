"""Logs: every request is one structured event (request id, user and key ids, model, status,
duration, tokens), and no secret or message content reaches the logs or the metrics.

A real server (uvicorn) with auth on and the engine simulator: log in, create a user and an API
key, refresh, run chat completions (whole and streamed), fail a login and send bad credentials,
scrape /metrics. Everything the process and its children wrote to stdout/stderr is captured.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

import httpx
import pytest
from sqlalchemy import select

from gateway.db import create_engine, create_session_factory
from gateway.keys.models import ApiKey
from gateway.keys.service import KEY_CACHE
from gateway.users.models import User
from tests.helpers.app import TEST_SECRET, make_settings, served_app
from tests.helpers.metrics import wait_engine_ready

ADMIN_PASSWORD = "adm1n-Logs-test-5a8c-pw"
USER_PASSWORD = "us3r-Logs-test-9e2b-pw"
WRONG_PASSWORD = "wr0ng-Logs-test-3f7d-pw"
METRICS_TOKEN = "logs-scrape-Jp4Rt8Wn2Qx6Zc"
CANARY = "canary-message-7Hq2Lm9Vx3"


async def _stored_secrets(url: str) -> set[str]:
    engine = create_engine(url, pool_size=1)
    try:
        async with create_session_factory(engine)() as session:
            hashes = {h for h in await session.scalars(select(User.password_hash)) if h}
            digests = set(await session.scalars(select(ApiKey.digest)))
    finally:
        await engine.dispose()
    pieces = set(digests)
    for stored in hashes:
        pieces.update(stored.rsplit("$", 2)[-2:])  # salt and hash of the PHC string
    return pieces


@pytest.fixture(autouse=True)
def _fresh_key_cache() -> None:
    KEY_CACHE.clear()


async def test_one_event_per_request_and_no_secrets_in_logs_or_metrics(
    sqlite_url: str, capfd: pytest.CaptureFixture[str]
) -> None:
    settings = make_settings(
        DATABASE_URL=sqlite_url,
        REQUIRE_AUTH=True,
        ADMIN_PASSWORD=ADMIN_PASSWORD,
        ENGINE="simulator",
        METRICS_TOKEN=METRICS_TOKEN,
        LOG_LEVEL="INFO",
    )
    sent: dict[str, dict[str, Any]] = {}  # request id -> what the test knows of it
    secrets: set[str] = {ADMIN_PASSWORD, USER_PASSWORD, WRONG_PASSWORD, METRICS_TOKEN, TEST_SECRET}
    replies: list[str] = []
    async with served_app(settings) as (_, base), httpx.AsyncClient(base_url=base) as http:
        await wait_engine_ready(http)

        async def call(method: str, path: str, **kwargs: Any) -> httpx.Response:
            request_id = uuid.uuid4().hex
            headers = {"X-Request-ID": request_id, **kwargs.pop("headers", {})}
            response = await http.request(method, path, headers=headers, **kwargs)
            sent[request_id] = {"path": path, "status": response.status_code}
            return response

        admin = await call(
            "POST", "/admin/api/login", json={"username": "admin", "password": ADMIN_PASSWORD}
        )
        admin_token = admin.json()["access_token"]
        created = await call(
            "POST",
            "/admin/api/users",
            json={"username": "lou", "password": USER_PASSWORD},
            headers={"Authorization": f"Bearer {admin_token}"},
        )
        assert created.status_code == 201, created.text
        login = (
            await call(
                "POST", "/api/auth/login", json={"username": "lou", "password": USER_PASSWORD}
            )
        ).json()
        refreshed = (
            await call("POST", "/api/auth/refresh", json={"refresh_token": login["refresh_token"]})
        ).json()
        user_auth = {"Authorization": f"Bearer {refreshed['access_token']}"}
        key = (
            await call("POST", "/api/keys", json={"description": "logs"}, headers=user_auth)
        ).json()
        secrets |= {
            admin_token,
            admin.json()["refresh_token"],
            login["access_token"],
            login["refresh_token"],
            refreshed["access_token"],
            refreshed["refresh_token"],
            key["key"],
        }
        key_auth = {"Authorization": f"Bearer {key['key']}"}
        body = {"model": "current", "messages": [{"role": "user", "content": CANARY}]}
        whole = await call(
            "POST", "/v1/chat/completions", json={**body, "max_tokens": 12}, headers=key_auth
        )
        assert whole.status_code == 200, whole.text
        replies.append(whole.json()["choices"][0]["message"]["content"])
        chat_ids = [next(reversed(sent))]
        streamed = await call(
            "POST",
            "/v1/chat/completions",
            json={**body, "max_tokens": 12, "stream": True},
            headers=key_auth,
        )
        assert streamed.status_code == 200
        replies.append(
            "".join(
                (json.loads(line[6:])["choices"] or [{}])[0].get("delta", {}).get("content") or ""
                for line in streamed.text.splitlines()
                if line.startswith("data: {")
            )
        )
        chat_ids.append(next(reversed(sent)))
        # Failures carry secrets in their requests too.
        wrong = await call(
            "POST", "/api/auth/login", json={"username": "lou", "password": WRONG_PASSWORD}
        )
        assert wrong.status_code == 401
        forged = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJsb2dzLXRlc3QifQ.c2lnbmF0dXJlLWxvZ3MtdGVzdA"
        secrets.add(forged)
        for bad in (forged, "sk-vcg-logs-test-not-a-key-4d1e8a", f"{key['key']}x"):
            response = await call("GET", "/v1/models", headers={"Authorization": f"Bearer {bad}"})
            assert response.status_code == 401
            secrets.add(bad)
        metrics = await call(
            "GET", "/metrics", headers={"Authorization": f"Bearer {METRICS_TOKEN}"}
        )
        assert metrics.status_code == 200
    secrets |= await _stored_secrets(sqlite_url)
    captured = capfd.readouterr()
    logs = captured.out + captured.err
    events = [json.loads(line) for line in logs.splitlines() if line.startswith("{")]

    # Every request: exactly one "request" event, carrying what an operator needs.
    requests = [e for e in events if e.get("event") == "request" and e.get("request_id") in sent]
    by_id: dict[str, list[dict[str, Any]]] = {}
    for event in requests:
        by_id.setdefault(event["request_id"], []).append(event)
    assert set(by_id) == set(sent)
    for request_id, lines in by_id.items():
        assert len(lines) == 1, lines
        line = lines[0]
        assert line["status"] == sent[request_id]["status"]
        assert isinstance(line["duration_ms"], float)
        assert {"user_id", "key_id", "model", "usage", "method", "path"} <= line.keys()
    for request_id in chat_ids:
        line = by_id[request_id][0]
        assert line["user_id"] == created.json()["id"]
        assert line["key_id"] == key["id"]
        assert line["model"] == "current"
        assert line["upstream"] == "local"
        assert line["usage"]["completion_tokens"] > 0
        assert line["usage"]["prompt_tokens"] > 0

    # Nothing secret, and no message content, in the logs or in the metrics.
    assert all(reply for reply in replies)
    for where, text in (("logs", logs), ("metrics", metrics.text)):
        for secret in secrets:
            assert secret not in text, f"a secret reached the {where}: {secret[:12]}..."
        assert CANARY not in text, f"message content reached the {where}"
        for reply in replies:
            assert reply not in text, f"a reply reached the {where}"
        assert "Bearer " not in text, where
        assert "argon2" not in text.lower(), where


CHAT_CANARY = "chat-canary-Zr5Kp8Wq2Nd6"


# DEBUG too: the database drivers log statements with their parameters there unless quieted.
@pytest.mark.parametrize("log_level", ["INFO", "DEBUG"])
async def test_chat_and_export_never_log_message_contents_or_credentials(
    sqlite_url: str, capfd: pytest.CaptureFixture[str], log_level: str
) -> None:
    """The chat API (POST /api/chat, whole and streamed, with a JWT and with an API key) and
    the conversation export (JSON and Markdown) carry message contents in both directions:
    none of it, and neither the credentials used, may reach the logs."""
    settings = make_settings(
        DATABASE_URL=sqlite_url,
        REQUIRE_AUTH=True,
        ADMIN_PASSWORD=ADMIN_PASSWORD,
        ENGINE="simulator",
        # INFO is the default; DEBUG is the most the gateway ever logs.
        LOG_LEVEL=log_level,
    )
    sent: list[str] = []
    async with served_app(settings) as (_, base), httpx.AsyncClient(base_url=base) as http:
        await wait_engine_ready(http)

        async def call(method: str, path: str, **kwargs: Any) -> httpx.Response:
            request_id = uuid.uuid4().hex
            headers = {"X-Request-ID": request_id, **kwargs.pop("headers", {})}
            response = await http.request(method, path, headers=headers, **kwargs)
            assert response.status_code < 300, response.text
            sent.append(request_id)
            return response

        login = await call(
            "POST", "/api/auth/login", json={"username": "admin", "password": ADMIN_PASSWORD}
        )
        token = login.json()["access_token"]
        jwt_auth = {"Authorization": f"Bearer {token}"}
        key = await call("POST", "/api/keys", json={"description": "chat"}, headers=jwt_auth)
        api_key = key.json()["key"]
        key_auth = {"Authorization": f"Bearer {api_key}"}

        whole = await call(
            "POST",
            "/api/chat",
            json={"model": "current", "message": f"{CHAT_CANARY} first", "max_tokens": 8},
            headers=jwt_auth,
        )
        conversation_id = whole.headers["X-Conversation-Id"]
        streamed = await call(
            "POST",
            "/api/chat",
            json={
                "conversation_id": conversation_id,
                "model": "current",
                "message": f"{CHAT_CANARY} second",
                "max_tokens": 8,
                "stream": True,
            },
            headers=jwt_auth,
        )
        assert streamed.headers["content-type"].startswith("text/event-stream")
        assert "data: [DONE]" in streamed.text
        # The same through an API key (another principal path), in a new conversation.
        by_key = await call(
            "POST",
            "/api/chat",
            json={"model": "current", "message": f"{CHAT_CANARY} third", "max_tokens": 8},
            headers=key_auth,
        )
        reply = whole.json()["choices"][0]["message"]["content"]
        assert reply

        exported_json = await call(
            "GET", f"/api/conversations/{conversation_id}/export", headers=jwt_auth
        )
        exported_md = await call(
            "GET",
            f"/api/conversations/{conversation_id}/export",
            params={"format": "markdown"},
            headers=jwt_auth,
        )
        # The exports really carry the contents (so their absence from the logs means something).
        for export in (exported_json, exported_md):
            assert f"{CHAT_CANARY} first" in export.text
            assert f"{CHAT_CANARY} second" in export.text
            assert reply in export.text
        assert exported_md.headers["content-type"].startswith("text/markdown")
        other = by_key.headers["X-Conversation-Id"]
        assert other != conversation_id
    captured = capfd.readouterr()
    logs = captured.out + captured.err
    events = [json.loads(line) for line in logs.splitlines() if line.startswith("{")]

    # The capture did see these requests: each one logged its single request event...
    logged = {e["request_id"]: e for e in events if e.get("event") == "request"}
    assert set(sent) <= set(logged), set(sent) - set(logged)
    chat_events = [logged[r] for r in sent if logged[r]["path"] == "/api/chat"]
    assert len(chat_events) == 3
    assert all(e["usage"]["completion_tokens"] > 0 for e in chat_events)
    # ...and none of the contents or credentials it handled.
    assert CHAT_CANARY not in logs, "message content reached the logs"
    assert reply not in logs, "a reply reached the logs"
    for secret in (
        ADMIN_PASSWORD,
        TEST_SECRET,
        token,
        login.json()["refresh_token"],
        api_key,
    ):
        assert secret not in logs, f"a credential reached the logs: {secret[:12]}..."
    assert "Bearer " not in logs
