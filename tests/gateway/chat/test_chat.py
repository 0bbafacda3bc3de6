"""POST /api/chat on real Postgres with the simulator engine: history, saving, idempotency."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import httpx
import pytest
from sqlalchemy import select

from gateway.db import create_engine, create_session_factory
from gateway.usage.models import UsageRecord
from tests.helpers.chat import chat, conversation, messages, stream_text
from tests.helpers.polling import eventually
from tests.helpers.proxy import sim_profile
from tests.helpers.quota import (
    bearer,
    create_key,
    create_user,
    error_code,
    login,
    quota_gateway,
    quota_settings,
)

pytestmark = pytest.mark.postgres

PROFILES = {"sim-a": sim_profile("sim-a", "--response-tokens", "6")}


async def _upstream_requests(gw: Any) -> list[dict[str, Any]]:
    url = await gw.wait_ready()
    reply = await gw.http.get(f"{url}/simulator/requests", headers=gw.engine_headers())
    assert reply.status_code == 200, reply.text
    return list(reply.json()["data"])


async def _conversation_count(http: httpx.AsyncClient, token: str) -> int:
    reply = await http.get("/api/conversations", headers=bearer(token))
    assert reply.status_code == 200, reply.text
    return len(reply.json()["data"])


async def test_multi_turn_history_goes_upstream_in_order_and_replies_are_saved(
    pg_url: str,
) -> None:
    async with quota_gateway(quota_settings(pg_url, profiles=PROFILES)) as gw:
        http = gw.http
        await create_user(http, "alice")
        token = await login(http, "alice")

        first = await chat(http, token, message="  What is   the capital of France?  ")
        assert first.status_code == 200, first.text
        conversation_id = first.headers["X-Conversation-Id"]
        first_reply = first.json()["choices"][0]["message"]["content"]
        assert first_reply
        assert first.headers["X-Message-Id"]

        second = await chat(
            http, token, conversation_id=conversation_id, message="And of Italy?", stream=True
        )
        assert second.status_code == 200, second.text
        assert second.headers["content-type"].startswith("text/event-stream")
        second_text, events = stream_text(second)
        assert events[-1] == "[DONE]"
        # The extra usage chunk the gateway asked for is not sent to this client.
        assert not any(isinstance(e, dict) and e.get("usage") and not e["choices"] for e in events)

        sent = await _upstream_requests(gw)
        assert sent[-1]["messages"] == [
            {"role": "user", "content": "  What is   the capital of France?  "},
            {"role": "assistant", "content": first_reply},
            {"role": "user", "content": "And of Italy?"},
        ]
        assert sent[-1]["stream"] is True

        detail = await conversation(http, token, conversation_id)
        assert detail["title"] == "What is the capital of France?"
        stored = detail["messages"]
        assert [(m["role"], m["status"]) for m in stored] == [
            ("user", "complete"),
            ("assistant", "complete"),
            ("user", "complete"),
            ("assistant", "complete"),
        ]
        assert [m["seq"] for m in stored] == [0, 1, 2, 3]
        assert stored[1]["content"] == first_reply
        assert stored[3]["content"] == second_text
        assert stored[3]["id"] == second.headers["X-Message-Id"]
        assert stored[3]["model"] == "sim-a"
        # Usage of the streamed reply came from the engine's usage chunk.
        assert stored[3]["completion_tokens"] == 6
        assert stored[3]["prompt_tokens"] > 0


async def test_messages_form_system_prompt_and_sampling_reach_the_engine(pg_url: str) -> None:
    async with quota_gateway(quota_settings(pg_url, profiles=PROFILES)) as gw:
        http = gw.http
        await create_user(http, "alice")
        token = await login(http, "alice")
        reply = await chat(
            http,
            token,
            model="current",
            messages=[
                {"role": "system", "content": "You answer briefly."},
                {"role": "user", "content": "안녕하세요!"},
            ],
            temperature=0.2,
            max_tokens=3,
        )
        assert reply.status_code == 200, reply.text
        sent = (await _upstream_requests(gw))[-1]
        assert sent["messages"][0] == {"role": "system", "content": "You answer briefly."}
        assert sent["temperature"] == 0.2
        assert sent["max_tokens"] == 3
        assert sent["model"] == "sim-a"  # "current" resolved to the active model
        stored = await messages(http, token, reply.headers["X-Conversation-Id"])
        assert [m["role"] for m in stored] == ["system", "user", "assistant"]


async def test_bad_input_is_refused_before_anything_is_saved(pg_url: str) -> None:
    async with quota_gateway(quota_settings(pg_url, profiles=PROFILES)) as gw:
        http = gw.http
        await create_user(http, "alice")
        token = await login(http, "alice")
        before = (await gw.sim_stats())["requests_total"]
        cases: list[tuple[dict[str, Any], str | None]] = [
            ({"message": "hi", "temperature": 3}, "temperature"),
            ({"message": "hi", "max_tokens": -1}, "max_tokens"),
            ({"message": "hi", "messages": [{"role": "user", "content": "x"}]}, "messages"),
            ({}, "message"),
            ({"message": "   "}, "message"),
            ({"message": "hi", "max_tokens": 2.5}, "max_tokens"),
            ({"message": "hi", "seed": 2**53}, "seed"),
            ({"messages": [{"role": "user", "content": "a"}, {"role": "system", "content": "b"}]},
             "messages"),
            ({"message": "hi", "api_base": "http://evil.example"}, "api_base"),
            ({"message": "hi", "messages": "nope"}, "messages"),
            ({"action": "regenerate"}, "conversation_id"),
            ({"action": "edit", "message": "x"}, "conversation_id"),
            ({"message": "hi", "stream": "yes"}, "stream"),
            # Postgres text cannot hold NUL: refused as the client's error, not a 503.
            ({"message": "a\u0000b"}, "message"),
            ({"messages": [{"role": "user", "content": "a\u0000b"}]}, "messages.0.content"),
            ({"message": "hi", "model": "sim\u0000a"}, "model"),
            ({"action": "edit", "conversation_id": str(uuid.uuid4()), "message": "a\u0000"},
             "message"),
        ]  # fmt: skip
        for body, param in cases:
            reply = await chat(http, token, **body)
            assert reply.status_code == 400, (body, reply.text)
            error = reply.json()["error"]
            assert error["param"] == param, (body, error)
            assert error["message"]
        missing = await chat(
            http, token, conversation_id="00000000-0000-4000-8000-000000000000", message="hi"
        )
        assert missing.status_code == 404
        assert error_code(missing) == "conversation_not_found"
        bad_key = await chat(http, token, message="hi", headers={"Idempotency-Key": "x" * 300})
        assert bad_key.status_code == 400
        assert await _conversation_count(http, token) == 0
        assert (await gw.sim_stats())["requests_total"] == before


async def test_a_message_too_long_for_the_context_is_a_400_and_history_is_trimmed(
    pg_url: str,
) -> None:
    settings = quota_settings(
        pg_url, profiles=PROFILES, CHAT_DEFAULT_CONTEXT=256, CHAT_BYTES_PER_TOKEN=1.0
    )
    async with quota_gateway(settings) as gw:
        http = gw.http
        await create_user(http, "alice")
        token = await login(http, "alice")
        too_long = await chat(http, token, message="x" * 300)
        assert too_long.status_code == 400
        assert error_code(too_long) == "context_length_exceeded"
        assert await _conversation_count(http, token) == 0

        first = await chat(http, token, message="a" * 90)
        conversation_id = first.headers["X-Conversation-Id"]
        second = await chat(http, token, conversation_id=conversation_id, message="b" * 90)
        assert second.status_code == 200, second.text
        # 256 - 64 reserved = 192 tokens: the newest user message (94) and the reply before it
        # fit, the first user message (94) no longer does.
        sent = (await _upstream_requests(gw))[-1]["messages"]
        assert sent[-1] == {"role": "user", "content": "b" * 90}
        assert {"role": "user", "content": "a" * 90} not in sent
        assert len(await messages(http, token, conversation_id)) == 4  # all still stored


async def test_regenerate_and_edit_replace_the_last_exchange(pg_url: str) -> None:
    async with quota_gateway(quota_settings(pg_url, profiles=PROFILES)) as gw:
        http = gw.http
        await create_user(http, "alice")
        token = await login(http, "alice")
        first = await chat(http, token, message="first question")
        conversation_id = first.headers["X-Conversation-Id"]
        await chat(http, token, conversation_id=conversation_id, message="second question")
        before = await messages(http, token, conversation_id)

        again = await chat(http, token, conversation_id=conversation_id, action="regenerate")
        assert again.status_code == 200, again.text
        after = await messages(http, token, conversation_id)
        assert len(after) == 4
        assert [m["id"] for m in after[:3]] == [m["id"] for m in before[:3]]
        assert after[3]["id"] == again.headers["X-Message-Id"] != before[3]["id"]
        assert after[3]["status"] == "complete"
        assert (await _upstream_requests(gw))[-1]["messages"][-1]["content"] == "second question"

        edited = await chat(
            http, token, conversation_id=conversation_id, action="edit", message="better question"
        )
        assert edited.status_code == 200, edited.text
        final = await messages(http, token, conversation_id)
        assert [m["content"] for m in final[:3]] == [
            "first question",
            before[1]["content"],
            "better question",
        ]
        assert final[2]["id"] == before[2]["id"]  # the same user message, new text
        assert len(final) == 4
        assert final[3]["id"] == edited.headers["X-Message-Id"]
        sent = (await _upstream_requests(gw))[-1]["messages"]
        assert [m["content"] for m in sent][-1] == "better question"
        assert "second question" not in [m["content"] for m in sent]

        # Nothing to answer again: no user message in the conversation. A 409, nothing saved.
        empty = await http.post("/api/conversations", json={}, headers=bearer(token))
        assert empty.status_code == 201, empty.text
        engine_calls = (await gw.sim_stats())["requests_total"]
        replays: list[tuple[str, dict[str, Any]]] = [
            ("regenerate", {}),
            ("edit", {"message": "new text"}),
        ]
        for action, extra in replays:
            nothing = await chat(
                http, token, conversation_id=empty.json()["id"], action=action, **extra
            )
            assert nothing.status_code == 409, (action, nothing.text)
            assert error_code(nothing) == "nothing_to_regenerate"
        assert await messages(http, token, empty.json()["id"]) == []
        assert (await gw.sim_stats())["requests_total"] == engine_calls


async def test_idempotency_key_retry_saves_nothing_twice(pg_url: str) -> None:
    async with quota_gateway(quota_settings(pg_url, profiles=PROFILES)) as gw:
        http = gw.http
        await create_user(http, "alice")
        token = await login(http, "alice")
        key = {"Idempotency-Key": "retry-1"}
        first = await chat(http, token, message="only once", headers=key)
        assert first.status_code == 200, first.text
        engine_calls = (await gw.sim_stats())["requests_total"]

        retry = await chat(http, token, message="only once", headers=key)
        assert retry.status_code == 200, retry.text
        assert retry.headers["Idempotent-Replayed"] == "true"
        assert retry.headers["X-Message-Id"] == first.headers["X-Message-Id"]
        assert (
            retry.json()["choices"][0]["message"]["content"]
            == (first.json()["choices"][0]["message"]["content"])
        )
        assert (await gw.sim_stats())["requests_total"] == engine_calls
        assert await _conversation_count(http, token) == 1
        stored = await messages(http, token, first.headers["X-Conversation-Id"])
        assert len(stored) == 2

        # A streamed request retried: the saved reply is replayed as a stream, no engine call.
        stream_key = {"Idempotency-Key": "retry-stream-1"}
        streamed = await chat(http, token, message="stream once", stream=True, headers=stream_key)
        assert streamed.status_code == 200, streamed.text
        streamed_text, _ = stream_text(streamed)
        assert streamed_text
        engine_calls = (await gw.sim_stats())["requests_total"]
        streamed_retry = await chat(
            http, token, message="stream once", stream=True, headers=stream_key
        )
        assert streamed_retry.status_code == 200, streamed_retry.text
        assert streamed_retry.headers["content-type"].startswith("text/event-stream")
        assert streamed_retry.headers["Idempotent-Replayed"] == "true"
        assert streamed_retry.headers["X-Message-Id"] == streamed.headers["X-Message-Id"]
        assert streamed_retry.headers["X-Conversation-Id"] == streamed.headers["X-Conversation-Id"]
        replayed_text, replayed_events = stream_text(streamed_retry)
        assert replayed_text == streamed_text
        assert replayed_events[-1] == "[DONE]"
        assert replayed_events[-2]["choices"][0]["finish_reason"] == "stop"
        assert (await gw.sim_stats())["requests_total"] == engine_calls
        assert len(await messages(http, token, streamed.headers["X-Conversation-Id"])) == 2
        assert await _conversation_count(http, token) == 2

        reused = await chat(http, token, message="something else", headers=key)
        assert reused.status_code == 422
        assert error_code(reused) == "idempotency_key_reused"

        # Keys are per user: bob's "retry-1" is a different request.
        await create_user(http, "bob")
        bob = await login(http, "bob")
        other = await chat(http, bob, message="only once", headers=key)
        assert other.status_code == 200
        assert other.headers["X-Conversation-Id"] != first.headers["X-Conversation-Id"]

        # Concurrent duplicates: one request reaches the engine, the others replay or wait.
        burst = await asyncio.gather(
            *(chat(http, token, message="burst", headers={"Idempotency-Key": "b"})
              for _ in range(4))
        )  # fmt: skip
        assert all(r.status_code in (200, 409) for r in burst), [r.text for r in burst]
        ids = {r.headers["X-Message-Id"] for r in burst}
        assert len(ids) == 1
        assert await _conversation_count(http, token) == 3


async def test_concurrent_chats_in_one_conversation_keep_their_order(pg_url: str) -> None:
    async with quota_gateway(quota_settings(pg_url, profiles=PROFILES)) as gw:
        http = gw.http
        await create_user(http, "alice")
        token = await login(http, "alice")
        first = await chat(http, token, message="start")
        conversation_id = first.headers["X-Conversation-Id"]
        replies = await asyncio.gather(
            *(
                chat(
                    http, token, conversation_id=conversation_id, message=f"q{i}", stream=i % 2 == 1
                )
                for i in range(6)
            )
        )
        assert all(r.status_code == 200 for r in replies), [r.text for r in replies]
        stored = await messages(http, token, conversation_id)
        assert len(stored) == 14
        assert [m["seq"] for m in stored] == list(range(14))
        # Every question is followed at once by its own reply.
        reply_of = {f"q{i}": r.headers["X-Message-Id"] for i, r in enumerate(replies)}
        for index, message in enumerate(stored):
            if message["role"] == "user" and message["content"] in reply_of:
                assert stored[index + 1]["id"] == reply_of[message["content"]]
                assert stored[index + 1]["status"] == "complete"


async def test_limits_apply_to_chat_and_usage_is_recorded(pg_url: str) -> None:
    settings = quota_settings(
        pg_url, profiles=PROFILES, RATE_LIMIT_FREE_PER_MINUTE=2, USAGE_FLUSH_INTERVAL_S=0.1
    )
    async with quota_gateway(settings) as gw:
        http = gw.http
        await create_user(http, "frugal", tier="free")
        key = await create_key(http, "frugal", tier="free")
        for _ in range(2):
            ok = await chat(http, key["key"], message="hello")
            assert ok.status_code == 200, ok.text
            assert "X-RateLimit-Remaining-Minute" in ok.headers
        refused = await chat(http, key["key"], message="hello")
        assert refused.status_code == 429
        assert refused.headers["Retry-After"]
        assert await _conversation_count(http, key["key"]) == 2  # the refused one saved nothing

        async def recorded() -> list[tuple[str, int, int]]:
            engine = create_engine(pg_url, pool_size=1)
            try:
                async with create_session_factory(engine)() as session:
                    rows = await session.scalars(
                        select(UsageRecord).where(UsageRecord.endpoint == "api_chat")
                    )
                    return [(r.model or "", r.status_code, r.completion_tokens) for r in rows]
            finally:
                await engine.dispose()

        rows = await eventually(lambda: _two(recorded), 10)
        assert sorted(rows) == [("sim-a", 200, 6), ("sim-a", 200, 6)]


async def _two(recorded: Any) -> list[tuple[str, int, int]] | None:
    rows: list[tuple[str, int, int]] = await recorded()
    return rows if len(rows) == 2 else None


async def test_anonymous_and_admin_key_callers_have_no_conversations(pg_url: str) -> None:
    async with quota_gateway(quota_settings(pg_url, profiles=PROFILES)) as gw:
        http = gw.http
        nobody = await http.post("/api/chat", json={"message": "hi"})
        assert nobody.status_code == 401
        from tests.helpers.quota import ADMIN

        admin_key = await http.post("/api/chat", json={"message": "hi"}, headers=ADMIN)
        assert admin_key.status_code == 401
        assert error_code(admin_key) == "user_required"


async def test_multi_turn_with_the_openai_sdk(pg_url: str) -> None:
    import openai

    async with quota_gateway(quota_settings(pg_url, profiles=PROFILES)) as gw:
        http = gw.http
        await create_user(http, "alice")
        token = await login(http, "alice")
        client = openai.AsyncOpenAI(base_url=f"{gw.url}/api", api_key=token, max_retries=0)
        raw = await client.chat.completions.with_raw_response.create(
            model="current", messages=[{"role": "user", "content": "Hi, I am Alice."}]
        )
        conversation_id = raw.headers["X-Conversation-Id"]
        first = raw.parse()
        assert first.choices[0].message.content
        stream = await client.chat.completions.create(
            model="current",
            messages=[{"role": "user", "content": "What is my name?"}],
            stream=True,
            extra_body={"conversation_id": conversation_id},
        )
        streamed = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
        assert streamed
        sent = (await _upstream_requests(gw))[-1]["messages"]
        assert [m["content"] for m in sent] == [
            "Hi, I am Alice.",
            first.choices[0].message.content,
            "What is my name?",
        ]
        stored = await messages(http, token, conversation_id)
        assert [m["content"] for m in stored] == [m["content"] for m in sent] + [streamed]
        with pytest.raises(openai.NotFoundError):
            await client.chat.completions.create(
                model="current",
                messages=[{"role": "user", "content": "x"}],
                extra_body={"conversation_id": "00000000-0000-4000-8000-000000000000"},
            )
        await client.close()
