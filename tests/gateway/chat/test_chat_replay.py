"""Idempotent retries and regenerate/edit of /api/chat against the state of the first reply:
failed upstream, replaced since, or still streaming (real Postgres, the simulator engine)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest

from tests.helpers.chat import chat, messages, settled_reply, stream_text
from tests.helpers.polling import eventually
from tests.helpers.proxy import Gateway, sim_profile
from tests.helpers.quota import (
    bearer,
    create_user,
    error_code,
    login,
    quota_gateway,
    quota_settings,
)

pytestmark = pytest.mark.postgres

# 400 tokens at 20 a second: a reply streams for 20 s, far longer than the checks made on it.
SLOW = {"sim-a": sim_profile("sim-a", "--tokens-per-second", "20", "--response-tokens", "400")}


async def _engine_calls(gw: Gateway) -> int:
    return int((await gw.sim_stats())["requests_total"])


@asynccontextmanager
async def _streaming(
    gw: Gateway, token: str, body: dict[str, Any], headers: dict[str, str] | None = None
) -> AsyncIterator[httpx.Response]:
    """A streamed /api/chat whose first delta arrived; the client leaves when the block ends."""
    async with (
        httpx.AsyncClient(base_url=gw.url, timeout=30) as client,
        client.stream(
            "POST",
            "/api/chat",
            json={**body, "stream": True},
            headers={**bearer(token), **(headers or {})},
        ) as response,
    ):
        assert response.status_code == 200
        # Read by hand: leaving an `async for` early would close the stream (a disconnect).
        lines = response.aiter_lines()
        while not (await anext(lines)).startswith("data: {"):
            continue
        yield response


async def test_retrying_a_request_that_failed_upstream_is_a_502_and_calls_nothing(
    pg_url: str,
) -> None:
    # The engine's real context is smaller than the gateway's estimate: it refuses the request.
    profiles = {"sim-a": sim_profile("sim-a", "--max-model-len", "64")}
    async with quota_gateway(quota_settings(pg_url, profiles=profiles)) as gw:
        http = gw.http
        await create_user(http, "alice")
        token = await login(http, "alice")
        key = {"Idempotency-Key": "fails-1"}
        body = {"message": "word " * 60, "max_tokens": 10}
        first = await chat(http, token, headers=key, **body)
        assert first.status_code == 400, first.text
        assert first.headers["X-Error-Source"] == "upstream"
        conversation_id = first.headers["X-Conversation-Id"]
        assert (await messages(http, token, conversation_id))[-1]["status"] == "error"
        engine_calls = await _engine_calls(gw)

        retry = await chat(http, token, headers=key, **body)
        assert retry.status_code == 502, retry.text
        assert error_code(retry) == "original_request_failed"
        assert retry.headers["X-Error-Source"] == "gateway"
        assert retry.headers["Idempotent-Replayed"] == "true"
        assert retry.headers["X-Conversation-Id"] == conversation_id
        assert retry.headers["X-Message-Id"] == first.headers["X-Message-Id"]
        assert retry.json()["error"]["message"].startswith(
            "The request with this Idempotency-Key failed: "
        )
        assert await _engine_calls(gw) == engine_calls
        assert len(await messages(http, token, conversation_id)) == 2
        listed = await http.get("/api/conversations", headers=bearer(token))
        assert [c["id"] for c in listed.json()["data"]] == [conversation_id]


async def test_retrying_after_the_reply_was_regenerated_is_a_409_and_saves_nothing(
    pg_url: str,
) -> None:
    profiles = {"sim-a": sim_profile("sim-a", "--response-tokens", "4")}
    async with quota_gateway(quota_settings(pg_url, profiles=profiles)) as gw:
        http = gw.http
        await create_user(http, "alice")
        token = await login(http, "alice")
        replays: list[tuple[str, dict[str, Any]]] = [
            ("regenerate", {}),
            ("edit", {"message": "better question"}),
        ]
        for action, extra in replays:
            key = {"Idempotency-Key": f"replaced-by-{action}"}
            first = await chat(http, token, message=f"question before {action}", headers=key)
            assert first.status_code == 200, first.text
            conversation_id = first.headers["X-Conversation-Id"]
            again = await chat(http, token, conversation_id=conversation_id, action=action, **extra)
            assert again.status_code == 200, again.text
            stored = await messages(http, token, conversation_id)
            assert [m["role"] for m in stored] == ["user", "assistant"]
            engine_calls = await _engine_calls(gw)

            retry = await chat(http, token, message=f"question before {action}", headers=key)
            assert retry.status_code == 409, (action, retry.text)
            assert error_code(retry) == "idempotency_reply_replaced"
            # Nothing new: no second conversation, no engine call, the replacement stays.
            assert await _engine_calls(gw) == engine_calls
            assert await messages(http, token, conversation_id) == stored
        listed = await http.get("/api/conversations", headers=bearer(token))
        assert len(listed.json()["data"]) == 2


async def test_retry_regenerate_and_edit_while_the_reply_streams_are_409s(pg_url: str) -> None:
    settings = quota_settings(pg_url, profiles=SLOW, CHAT_SAVE_INTERVAL_S=0.2)
    async with quota_gateway(settings) as gw:
        http = gw.http
        await create_user(http, "alice")
        token = await login(http, "alice")
        start = await chat(http, token, message="first", max_tokens=2)
        assert start.status_code == 200, start.text
        conversation_id = start.headers["X-Conversation-Id"]
        key = {"Idempotency-Key": "slow-1"}
        body = {"conversation_id": conversation_id, "message": "a long one"}

        async with _streaming(gw, token, body, key) as streaming:
            message_id = streaming.headers["X-Message-Id"]
            engine_calls = await _engine_calls(gw)
            retry = await chat(http, token, headers=key, stream=True, **body)
            assert retry.status_code == 409, retry.text
            assert error_code(retry) == "request_in_progress"
            assert retry.headers["Retry-After"] == "1"
            assert retry.headers["Idempotent-Replayed"] == "true"
            assert retry.headers["X-Message-Id"] == message_id
            assert retry.headers["X-Conversation-Id"] == conversation_id
            # `stream` is part of the request: the same key without it is another request.
            other = await chat(http, token, headers=key, **body)
            assert other.status_code == 422, other.text
            assert error_code(other) == "idempotency_key_reused"

            replays: list[tuple[str, dict[str, Any]]] = [
                ("regenerate", {}),
                ("edit", {"message": "changed"}),
            ]
            for action, extra in replays:
                refused = await chat(
                    http, token, conversation_id=conversation_id, action=action, **extra
                )
                assert refused.status_code == 409, (action, refused.text)
                assert error_code(refused) == "reply_in_progress"
            assert await _engine_calls(gw) == engine_calls
            stored = await messages(http, token, conversation_id)
            assert [(m["role"], m["content"][:10] if m["role"] == "user" else m["status"])
                    for m in stored] == [
                ("user", "first"),
                ("assistant", "complete"),
                ("user", "a long one"),
                ("assistant", "streaming"),
            ]  # fmt: skip
            assert stored[-1]["id"] == message_id

        # The client left: the reply is saved as delivered, and the retry now replays it.
        saved = await eventually(lambda: settled_reply(http, token, conversation_id), 10)
        assert saved["status"] == "incomplete"
        replayed = await chat(http, token, headers=key, stream=True, **body)
        assert replayed.status_code == 200, replayed.text
        assert replayed.headers["Idempotent-Replayed"] == "true"
        text, events = stream_text(replayed)
        assert text == saved["content"]
        assert events[-1]["error"]["code"] == "reply_incomplete"
        # ... and regenerate is allowed again.
        again = await chat(
            http, token, conversation_id=conversation_id, action="regenerate", max_tokens=2
        )
        assert again.status_code == 200, again.text


async def test_a_replay_is_the_same_response_streamed_or_not(pg_url: str) -> None:
    # Replies of 12 tokens cut at 5: the finish_reason is "length", which a replay keeps too.
    profiles = {"sim-a": sim_profile("sim-a", "--response-tokens", "12")}
    async with quota_gateway(quota_settings(pg_url, profiles=profiles)) as gw:
        http = gw.http
        await create_user(http, "alice")
        token = await login(http, "alice")

        key = {"Idempotency-Key": "same-whole"}
        body = {"message": "a question", "max_tokens": 5}
        first = await chat(http, token, headers=key, **body)
        assert first.status_code == 200, first.text
        engine_calls = await _engine_calls(gw)
        replayed = await chat(http, token, headers=key, **body)
        assert replayed.status_code == 200, replayed.text
        assert replayed.headers["Idempotent-Replayed"] == "true"
        assert "Idempotent-Replayed" not in first.headers
        original = first.json()
        assert original["choices"][0]["finish_reason"] == "length"
        # The same JSON (id, created, model, choices, usage and the rest), byte for byte.
        assert replayed.json() == original
        assert replayed.content == first.content
        assert replayed.headers["X-Message-Id"] == first.headers["X-Message-Id"]

        key = {"Idempotency-Key": "same-stream"}
        body = {"message": "another question", "max_tokens": 5, "stream": True}
        streamed = await chat(http, token, headers=key, **body)
        assert streamed.status_code == 200, streamed.text
        replayed_stream = await chat(http, token, headers=key, **body)
        assert replayed_stream.status_code == 200, replayed_stream.text
        assert replayed_stream.headers["Idempotent-Replayed"] == "true"
        text, events = stream_text(streamed)
        again, replay_events = stream_text(replayed_stream)
        assert again == text
        assert events[-1] == replay_events[-1] == "[DONE]"

        def shared(chunks: list[Any], field: str) -> set[Any]:
            return {chunk[field] for chunk in chunks if isinstance(chunk, dict)}

        for field in ("id", "created", "model", "object"):
            assert len(shared(events, field)) == 1, field
            assert shared(replay_events, field) == shared(events, field), field

        def finish(chunks: list[Any]) -> list[Any]:
            return [
                choice["finish_reason"]
                for chunk in chunks
                if isinstance(chunk, dict)
                for choice in chunk["choices"]
                if choice["finish_reason"] is not None
            ]

        assert finish(replay_events) == finish(events) == ["length"]

        # Nothing duplicated: no engine call, one conversation per key, one reply in each.
        assert await _engine_calls(gw) == engine_calls + 1
        listed = (await http.get("/api/conversations", headers=bearer(token))).json()["data"]
        assert len(listed) == 2
        for response in (first, streamed):
            stored = await messages(http, token, response.headers["X-Conversation-Id"])
            assert [(m["role"], m["status"]) for m in stored] == [
                ("user", "complete"),
                ("assistant", "complete"),
            ]
