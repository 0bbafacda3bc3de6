"""Who may call /v1: API keys and access tokens (raw HTTP and the openai SDK), nobody without
credentials or with a revoked or expired key, and only the models a key allows."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import openai
import pytest

from tests.helpers.proxy import sim_profile
from tests.helpers.quota import (
    ADMIN,
    HELLO,
    Gateway,
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

IGNORE_EOS = {"ignore_eos": True}


def _sdk(gw: Gateway, credential: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{gw.url}/v1", api_key=credential, max_retries=0)


def _assert_401(response: httpx.Response, code: str) -> None:
    assert response.status_code == 401, response.text
    assert error_code(response) == code
    assert response.json()["error"]["type"] == "authentication_error"
    assert response.headers["www-authenticate"].startswith("Bearer")


async def _engine_requests(gw: Gateway) -> int:
    return int((await gw.sim_stats())["requests_total"])


async def _my_keys(http: httpx.AsyncClient, token: str) -> dict[str, str]:
    reply = await http.get("/api/keys", headers=bearer(token))
    assert reply.status_code == 200, reply.text
    return {entry["id"]: entry["status"] for entry in reply.json()["data"]}


async def test_api_keys_and_access_tokens_both_open_v1(pg_url: str) -> None:
    async with quota_gateway(quota_settings(pg_url)) as gw:
        http = gw.http
        alice = await create_user(http, "alice")
        token = await login(http, "alice")
        created = await create_key(http, "alice", description="ci")
        assert created["user_id"] == alice["id"]
        key = created["key"]

        for credential in (key, token):
            headers = bearer(credential)
            reply = await chat(http, headers, max_tokens=6)
            assert reply.status_code == 200, reply.text
            assert reply.json()["usage"]["completion_tokens"] == 6
            streamed = await chat(http, headers, max_tokens=3, stream=True)
            assert streamed.status_code == 200, streamed.text
            events = sse_events(streamed)
            assert events[-1] == "[DONE]"
            assert "".join(
                e["choices"][0]["delta"].get("content") or "" for e in events[:-1] if e["choices"]
            )
            models = await http.get("/v1/models", headers=headers)
            assert models.status_code == 200, models.text
            assert "sim-a" in {m["id"] for m in models.json()["data"]}
            # Self-service listing works with either credential, and shows alice's key only.
            keys = await http.get("/api/keys", headers=headers)
            assert keys.status_code == 200, keys.text
            assert [k["id"] for k in keys.json()["data"]] == [created["id"]]

        # The official SDK, with the key (and with the access token) as its api_key.
        for credential in (key, token):
            async with _sdk(gw, credential) as sdk:
                completion = await sdk.chat.completions.create(
                    model="sim-a", messages=HELLO, max_tokens=4, extra_body=IGNORE_EOS
                )
                assert completion.usage is not None
                assert completion.usage.completion_tokens == 4
                assert "sim-a" in {m.id async for m in sdk.models.list()}
                stream = await sdk.chat.completions.create(
                    model="current", messages=HELLO, max_tokens=5, stream=True,
                    extra_body=IGNORE_EOS,
                )  # fmt: skip
                chunks = [chunk async for chunk in stream]
                assert sum(len(c.choices) for c in chunks) >= 5
                assert chunks[-1].choices[0].finish_reason == "length"


async def test_missing_unknown_revoked_and_expired_credentials_are_401(pg_url: str) -> None:
    async with quota_gateway(quota_settings(pg_url)) as gw:
        http = gw.http
        await create_user(http, "bob")
        token = await login(http, "bob")
        revoked = await create_key(http, "bob")
        soon = datetime.now(UTC) + timedelta(seconds=2)
        # One key is used (so cached) before it expires, the other is first used after.
        expiring_used = await create_key(http, "bob", expires_at=soon.isoformat())
        expiring_unused = await create_key(http, "bob", expires_at=soon.isoformat())
        for created in (revoked, expiring_used):
            assert (await chat(http, bearer(created["key"]))).status_code == 200
        served = await _engine_requests(gw)

        # No credentials at all.
        _assert_401(await chat(http, {}), "missing_credentials")
        _assert_401(await http.get("/v1/models"), "missing_credentials")
        _assert_401(await http.get("/api/keys"), "missing_credentials")
        # A key of the right shape that was never issued.
        unknown = "sk-vcg-" + "A" * 43
        _assert_401(await chat(http, bearer(unknown)), "invalid_api_key")
        async with _sdk(gw, unknown) as sdk:
            with pytest.raises(openai.AuthenticationError) as raised:
                await sdk.chat.completions.create(model="sim-a", messages=HELLO, max_tokens=2)
            assert raised.value.status_code == 401
            with pytest.raises(openai.AuthenticationError):
                await sdk.models.list()

        # Revoked: refused at once (the key was cached by the request above).
        gone = await http.delete(f"/admin/api/keys/{revoked['id']}", headers=ADMIN)
        assert gone.status_code == 204, gone.text
        _assert_401(await chat(http, bearer(revoked["key"])), "invalid_api_key")
        _assert_401(await http.get("/v1/models", headers=bearer(revoked["key"])), "invalid_api_key")
        async with _sdk(gw, revoked["key"]) as sdk:
            with pytest.raises(openai.AuthenticationError):
                await sdk.chat.completions.create(model="sim-a", messages=HELLO, max_tokens=2)

        # Expired: refused once the time has passed, cached or not.
        await asyncio.sleep(max(0.0, (soon - datetime.now(UTC)).total_seconds()) + 0.1)
        for created in (expiring_used, expiring_unused):
            _assert_401(await chat(http, bearer(created["key"])), "invalid_api_key")
            _assert_401(
                await http.get("/api/keys", headers=bearer(created["key"])), "invalid_api_key"
            )

        # None of the refused requests reached the engine; the owner's login still works.
        assert await _engine_requests(gw) == served
        assert (await chat(http, bearer(token))).status_code == 200
        assert await _my_keys(http, token) == {
            revoked["id"]: "revoked",
            expiring_used["id"]: "expired",
            expiring_unused["id"]: "expired",
        }


def _profiles() -> dict[str, dict[str, Any]]:
    return {"sim-a": sim_profile("sim-a"), "sim-b": sim_profile("sim-b")}


async def _status(http: httpx.AsyncClient, key: str, model: str | None) -> tuple[int, Any]:
    reply = await chat(http, bearer(key), model)
    return reply.status_code, error_code(reply) if reply.status_code != 200 else None


async def test_a_key_reaches_only_its_allowed_models(pg_url: str) -> None:
    async with quota_gateway(quota_settings(pg_url, profiles=_profiles())) as gw:
        http = gw.http
        only_a = (await create_key(http, "svc", allowed_models=["sim-a"]))["key"]
        only_b = (await create_key(http, "svc", allowed_models=["sim-b"]))["key"]
        every = (await create_key(http, "svc"))["key"]
        served = await _engine_requests(gw)

        # sim-a is loaded: "current" (and no model at all) means sim-a.
        assert await _status(http, only_a, "sim-a") == (200, None)
        assert await _status(http, only_a, "current") == (200, None)
        assert await _status(http, only_a, None) == (200, None)
        assert await _status(http, every, "current") == (200, None)
        refused = await chat(http, bearer(only_a), "sim-b")
        assert refused.status_code == 403, refused.text
        assert refused.json()["error"]["param"] == "model"
        assert error_code(refused) == "model_not_allowed"
        for model in ("sim-a", "current", None):
            assert await _status(http, only_b, model) == (403, "model_not_allowed"), model
        # sim-b is allowed for only_b: it passes the scope check and meets the scheduler instead.
        assert await _status(http, only_b, "sim-b") == (404, "model_not_loaded")
        async with _sdk(gw, only_b) as sdk:
            with pytest.raises(openai.PermissionDeniedError) as raised:
                await sdk.chat.completions.create(model="sim-a", messages=HELLO, max_tokens=2)
            assert raised.value.code == "model_not_allowed"
        assert await _engine_requests(gw) == served + 4

        # Switch to sim-b: "current" follows the loaded model.
        job = await gw.switch("sim-b")
        assert job["status"] == "succeeded", job
        await gw.wait_ready("sim-b")
        assert await _status(http, only_b, "current") == (200, None)
        assert await _status(http, only_b, "sim-b") == (200, None)
        assert await _status(http, only_a, "current") == (403, "model_not_allowed")
        assert await _status(http, only_a, "sim-b") == (403, "model_not_allowed")
        assert await _status(http, every, "sim-b") == (200, None)
