"""A model name is logged and echoed only when it names a known model: a key pasted into
`model` (or any unknown name) never reaches a log line or an error body, on /v1/* and /api/chat.

A real server (uvicorn) with auth on, the engine simulator, JSON logs captured from the process.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

import httpx
import pytest

from tests.helpers.proxy import ADMIN_KEY, sim_profile
from tests.helpers.quota import (
    bearer,
    create_key,
    create_user,
    error_code,
    login,
    quota_gateway,
    quota_settings,
)

# sim-a runs; sim-b is a profile that is known but not loaded; sim-a's alias starts like one of
# our keys, so even a known name of that shape is never shown.
PROFILES = {
    "sim-a": sim_profile("sim-a", aliases=("alias-a", "sk-vcg-alias-of-sim-a")),
    "sim-b": sim_profile("sim-b"),
}
HELLO = [{"role": "user", "content": "hi"}]


def _body(path: str, model: str) -> dict[str, Any]:
    if path == "/v1/completions":
        return {"model": model, "prompt": "hi", "max_tokens": 2}
    if path == "/v1/embeddings":
        return {"model": model, "input": "hi"}
    if path == "/api/chat":
        return {"model": model, "message": "hi", "max_tokens": 2}
    return {"model": model, "messages": HELLO, "max_tokens": 2}


ROUTES = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/api/chat")


async def test_unknown_and_key_like_model_names_are_never_logged_or_echoed(
    sqlite_url: str, capfd: pytest.CaptureFixture[str]
) -> None:
    settings = quota_settings(sqlite_url, profiles=PROFILES, LOG_LEVEL="INFO")
    sent: dict[str, tuple[str, str]] = {}  # request id -> (path, model)
    async with quota_gateway(settings) as gw:
        http = gw.http
        await create_user(http, "mo")
        token = await login(http, "mo")
        key = (await create_key(http, "mo"))["key"]
        scoped = (await create_key(http, "mo", allowed_models=["sim-a"]))["key"]
        callers = {"jwt": bearer(token), "key": bearer(key), "scoped": bearer(scoped)}

        async def call(path: str, model: str, caller: str) -> httpx.Response:
            request_id = uuid.uuid4().hex
            headers = {"X-Request-ID": request_id, **callers[caller]}
            response = await http.post(path, json=_body(path, model), headers=headers)
            sent[request_id] = (path, model)
            return response

        # What could be a secret: the caller's own key, the admin key, a key of our shape, and
        # a plain unknown name (what it says is nobody's business but the caller's).
        hidden = [key, ADMIN_KEY, "sk-vcg-" + uuid.uuid4().hex, "no-such-model-" + uuid.uuid4().hex]
        for path in ROUTES:
            for caller in ("jwt", "key", "scoped"):
                for model in hidden:
                    response = await call(path, model, caller)
                    # A key limited to some models is refused first (403), the others 404.
                    expected = 403 if caller == "scoped" else 404
                    assert response.status_code == expected, (path, caller, response.text)
                    assert error_code(response) == (
                        "model_not_allowed" if caller == "scoped" else "model_not_found"
                    )
                    assert model not in response.text, (path, caller)
                    assert f"of {len(model)} characters" in response.json()["error"]["message"]

        # Nothing was saved for the refused /api/chat requests.
        listed = await http.get("/api/conversations", headers=callers["jwt"])
        assert listed.json()["data"] == []

        # Known names are still named: served, refused for scope, or not loaded.
        for path in ROUTES:
            for model in ("sim-a", "alias-a", "current"):
                response = await call(path, model, "key")
                assert response.status_code == 200, (path, model, response.text)
        refused = await call("/v1/chat/completions", "sim-b", "scoped")
        assert refused.status_code == 403
        assert "'sim-b'" in refused.json()["error"]["message"]
        not_loaded = await call("/api/chat", "sim-b", "jwt")
        assert not_loaded.status_code == 404
        assert error_code(not_loaded) == "model_not_loaded"
        assert "'sim-b'" in not_loaded.json()["error"]["message"]
        # A known alias shaped like one of our keys is served, and shown by its length only.
        key_like_alias = await call("/v1/chat/completions", "sk-vcg-alias-of-sim-a", "key")
        assert key_like_alias.status_code == 200, key_like_alias.text
        hidden.append("sk-vcg-alias-of-sim-a")
    captured = capfd.readouterr()
    logs = captured.out + captured.err
    events = [json.loads(line) for line in logs.splitlines() if line.startswith("{")]
    logged = {e["request_id"]: e for e in events if e.get("event") == "request"}
    assert set(sent) <= set(logged), set(sent) - set(logged)
    for request_id, (path, model) in sent.items():
        event = logged[request_id]
        assert event["path"] == path
        if model in hidden:
            assert event["model"] == f"<unknown model name of {len(model)} characters>", event
        else:
            assert event["model"] == model, event
    for model in hidden:
        assert model not in logs, f"a model name that may be a secret was logged: {model[:10]}"
