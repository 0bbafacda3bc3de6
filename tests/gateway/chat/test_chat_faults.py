"""Replies cut short are saved as delivered: engine death, error events, client disconnects,
and a gateway killed with SIGKILL mid-stream (its row is marked interrupted at restart)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.helpers.chat import (
    chat,
    engine_ready,
    gateway_process,
    last_message,
    messages,
    settled_reply,
    stream_text,
)
from tests.helpers.polling import eventually
from tests.helpers.ports import free_port
from tests.helpers.proxy import sim_profile, write_profiles
from tests.helpers.quota import (
    bearer,
    create_user,
    login,
    quota_gateway,
    quota_settings,
)

pytestmark = pytest.mark.postgres


@pytest.mark.parametrize(
    ("flag", "error_code"),
    [("--die-after-chunks", "upstream_disconnected"), ("--error-after-chunks", None)],
)
async def test_engine_failing_mid_stream_saves_the_partial_reply_and_sends_an_error_event(
    pg_url: str, flag: str, error_code: str | None
) -> None:
    profiles = {"sim-a": sim_profile("sim-a", flag, "3", "--response-tokens", "20")}
    async with quota_gateway(quota_settings(pg_url, profiles=profiles)) as gw:
        http = gw.http
        await create_user(http, "alice")
        token = await login(http, "alice")
        reply = await chat(http, token, message="tell me a long story", stream=True)
        assert reply.status_code == 200
        text, events = stream_text(reply)
        assert text  # three chunks arrived before the failure
        # An engine error event is relayed as sent (vLLM ends such a stream with [DONE]);
        # a lost engine gets the gateway's own error event and no [DONE].
        errors = [e["error"] for e in events if isinstance(e, dict) and "error" in e]
        assert len(errors) == 1
        assert errors[0]["message"]
        if error_code is not None:
            assert errors[0]["code"] == error_code
            assert "[DONE]" not in events
        saved = await last_message(http, token, reply.headers["X-Conversation-Id"])
        assert saved["id"] == reply.headers["X-Message-Id"]
        assert saved["status"] == "incomplete"
        assert saved["content"] == text  # exactly what the client received
        assert saved["error"]
        if flag == "--error-after-chunks":
            # The cut-short reply stays in the conversation but never goes upstream again.
            follow = await chat(
                http,
                token,
                conversation_id=reply.headers["X-Conversation-Id"],
                message="more",
                stream=True,
            )
            assert follow.status_code == 200, follow.text
            url = await gw.wait_ready()
            upstream = await http.get(f"{url}/simulator/requests", headers=gw.engine_headers())
            sent = upstream.json()["data"][-1]["messages"]
            assert [m["role"] for m in sent] == ["user", "user"]
            assert text not in [m["content"] for m in sent]


async def test_engine_refusing_the_request_saves_an_error_reply(pg_url: str) -> None:
    profiles = {"sim-a": sim_profile("sim-a", "--max-model-len", "64")}
    async with quota_gateway(quota_settings(pg_url, profiles=profiles)) as gw:
        http = gw.http
        await create_user(http, "alice")
        token = await login(http, "alice")
        # The gateway's context estimate is its default; the engine's real limit is smaller.
        reply = await chat(http, token, message="word " * 60, max_tokens=10)
        assert reply.status_code == 400, reply.text
        assert reply.headers["X-Error-Source"] == "upstream"
        saved = await last_message(http, token, reply.headers["X-Conversation-Id"])
        assert saved["status"] == "error"
        assert saved["content"] == ""
        assert saved["error"]
        # Edit-and-resend fixes it: the too-long message is replaced, the error reply dropped.
        again = await chat(
            http,
            token,
            conversation_id=reply.headers["X-Conversation-Id"],
            action="edit",
            message="short",
        )
        assert again.status_code == 200, again.text
        url = await gw.wait_ready()
        upstream = await http.get(f"{url}/simulator/requests", headers=gw.engine_headers())
        sent = upstream.json()["data"][-1]["messages"]
        assert sent == [{"role": "user", "content": "short"}]
        stored = await messages(http, token, reply.headers["X-Conversation-Id"])
        assert [(m["role"], m["status"]) for m in stored] == [
            ("user", "complete"),
            ("assistant", "complete"),
        ]


async def test_client_disconnect_saves_what_was_delivered(pg_url: str) -> None:
    profiles = {
        "sim-a": sim_profile("sim-a", "--tokens-per-second", "20", "--response-tokens", "400")
    }
    settings = quota_settings(pg_url, profiles=profiles, CHAT_SAVE_INTERVAL_S=0.2)
    async with quota_gateway(settings) as gw:
        http = gw.http
        await create_user(http, "alice")
        token = await login(http, "alice")
        received = ""
        async with (
            httpx.AsyncClient(base_url=gw.url, timeout=30) as client,
            client.stream(
                "POST",
                "/api/chat",
                json={"message": "stream a lot", "stream": True},
                headers=bearer(token),
            ) as response,
        ):
            assert response.status_code == 200
            conversation_id = response.headers["X-Conversation-Id"]
            chunks = 0
            # Held: a dropped line iterator is finalized soon after the break below, and its
            # close closes the connection, so the reply would end before it is looked at.
            lines = response.aiter_lines()
            async for line in lines:
                if line.startswith("data: {"):
                    event = json.loads(line[6:])
                    for choice in event.get("choices", []):
                        received += choice["delta"].get("content") or ""
                    chunks += 1
                if chunks >= 8:
                    break
            # While streaming, the reply is saved as it grows.
            partial = await eventually(lambda: _partial_saved(http, token, conversation_id), 5)
            assert partial["status"] == "streaming"
        # The client is gone: the engine sees the abort, the reply is saved as delivered.
        await eventually(lambda: _aborted(gw), 10)
        saved = await eventually(lambda: settled_reply(http, token, conversation_id), 10)
        assert saved["status"] == "incomplete"
        assert saved["content"].startswith(received)
        assert len(saved["content"]) < 400 * 4  # not the whole reply
        assert saved["error"] == "The client closed the connection."


async def test_client_leaving_a_whole_response_early_saves_an_incomplete_reply(
    pg_url: str,
) -> None:
    profiles = {"sim-a": sim_profile("sim-a", "--first-token-delay", "5")}
    async with quota_gateway(quota_settings(pg_url, profiles=profiles)) as gw:
        http = gw.http
        await create_user(http, "alice")
        token = await login(http, "alice")
        with pytest.raises(httpx.ReadTimeout):
            await http.post(
                "/api/chat", json={"message": "slow"}, headers=bearer(token), timeout=1.0
            )
        await eventually(lambda: _aborted(gw), 5)
        listed = (await http.get("/api/conversations", headers=bearer(token))).json()["data"]
        conversation_id = listed[0]["id"]
        saved = await eventually(lambda: settled_reply(http, token, conversation_id), 5)
        assert saved["status"] == "incomplete"
        assert saved["content"] == ""
        stats = await gw.sim_stats()
        assert stats["running"] == 0  # the engine's slot is free again
        lb = await http.get("/lb/status", headers=bearer(token))
        assert lb.json()["current_requests"] == 0


async def _partial_saved(http: httpx.AsyncClient, token: str, conversation_id: str) -> Any:
    reply = await last_message(http, token, conversation_id)
    return reply if reply["content"] else None


async def _aborted(gw: Any) -> bool:
    return bool((await gw.sim_stats())["aborted_total"] >= 1)


# -- kill -9 -----------------------------------------------------------------------------------


async def test_rows_left_streaming_by_a_killed_gateway_are_marked_interrupted(
    pg_url: str, tmp_path: Path
) -> None:
    profiles = write_profiles(
        {"sim-a": sim_profile("sim-a", "--tokens-per-second", "20", "--response-tokens", "400")},
        "sim-a",
    )
    port = free_port()
    first = gateway_process(pg_url, tmp_path, port, profiles)
    second: subprocess.Popen[bytes] | None = None
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30) as http:
            await eventually(lambda: engine_ready(http), 60, 0.2)
            await create_user(http, "alice")
            token = await login(http, "alice")
            async with http.stream(
                "POST",
                "/api/chat",
                json={"message": "a long one", "stream": True},
                headers={**bearer(token), "Idempotency-Key": "crash-1"},
            ) as response:
                conversation_id = response.headers["X-Conversation-Id"]
                # Read by hand: leaving an `async for` would close the stream (a disconnect).
                lines = response.aiter_lines()
                while not (await anext(lines)).startswith("data: {"):
                    continue
                await eventually(lambda: _partial_saved(http, token, conversation_id), 5)
                os.kill(first.pid, signal.SIGKILL)
                first.wait(10)
        second = gateway_process(pg_url, tmp_path, port, profiles)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30) as http:
            await eventually(lambda: engine_ready(http), 60, 0.2)
            token = await login(http, "alice")
            saved = await last_message(http, token, conversation_id)
            assert saved["status"] == "interrupted", saved
            assert saved["content"]  # the text saved while streaming stays
            assert saved["error"]
            # The client's retry with the same key duplicates nothing: it gets what was saved.
            retry = await http.post(
                "/api/chat",
                json={"message": "a long one", "stream": True},
                headers={**bearer(token), "Idempotency-Key": "crash-1"},
            )
            assert retry.status_code == 200, retry.text
            assert retry.headers["Idempotent-Replayed"] == "true"
            text, events = stream_text(retry)
            assert text == saved["content"]
            assert events[-1]["error"]["code"] == "reply_incomplete"
            assert len(await messages(http, token, conversation_id)) == 2
    finally:
        for process in (first, second):
            if process is not None and process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(30)
                except subprocess.TimeoutExpired:
                    process.kill()
        await asyncio.sleep(0)
