"""Two gateway processes (`python -m gateway serve`) on one Postgres database chatting into the
same conversation at once: the conversation's row lock, not the per-process asyncio lock, keeps
every question followed by its own reply."""

from __future__ import annotations

import asyncio
import functools
import subprocess
from pathlib import Path

import httpx
import pytest

from tests.helpers.chat import engine_ready, gateway_process, messages, stop_process
from tests.helpers.polling import eventually
from tests.helpers.ports import free_port
from tests.helpers.proxy import sim_profile, write_profiles
from tests.helpers.quota import bearer, create_user, login

pytestmark = pytest.mark.postgres

PER_GATEWAY = 6


async def test_concurrent_chats_from_two_gateway_processes_stay_ordered_and_complete(
    pg_url: str, tmp_path: Path
) -> None:
    # Short streams at a set pace, so the requests of both processes overlap.
    profiles = write_profiles(
        {"sim-a": sim_profile("sim-a", "--tokens-per-second", "100", "--response-tokens", "8")},
        "sim-a",
    )
    ports = (free_port(), free_port())
    processes: list[subprocess.Popen[bytes]] = []
    try:
        for index, port in enumerate(ports):
            # Each process has its own state dir, so its own simulator engine.
            processes.append(gateway_process(pg_url, tmp_path / f"gw-{index}", port, profiles))
        async with (
            httpx.AsyncClient(base_url=f"http://127.0.0.1:{ports[0]}", timeout=60) as one,
            httpx.AsyncClient(base_url=f"http://127.0.0.1:{ports[1]}", timeout=60) as two,
        ):
            for http in (one, two):
                await eventually(functools.partial(engine_ready, http), 60, 0.2)
            await create_user(one, "alice")
            token = await login(one, "alice")  # a JWT: both processes share the secret
            start = await one.post("/api/chat", json={"message": "start"}, headers=bearer(token))
            assert start.status_code == 200, start.text
            conversation_id = start.headers["X-Conversation-Id"]

            async def ask(http: httpx.AsyncClient, question: str, stream: bool) -> httpx.Response:
                body = {"conversation_id": conversation_id, "message": question, "stream": stream}
                return await http.post("/api/chat", json=body, headers=bearer(token))

            questions = [
                (http, f"{name}-q{i}", i % 2 == 1)
                for i in range(PER_GATEWAY)
                for name, http in (("one", one), ("two", two))
            ]
            replies = await asyncio.gather(*(ask(*q) for q in questions))
            assert all(r.status_code == 200 for r in replies), [r.text for r in replies]

            stored = await messages(two, token, conversation_id)
            total = 2 + 2 * len(questions)
            assert [m["seq"] for m in stored] == list(range(total))
            assert [m["role"] for m in stored] == ["user", "assistant"] * (total // 2)
            assert all(m["status"] == "complete" and m["content"] for m in stored)
            # Every question is followed at once by the reply its request returned.
            reply_of = {
                q[1]: r.headers["X-Message-Id"] for q, r in zip(questions, replies, strict=True)
            }
            asked = [m for m in stored if m["role"] == "user"][1:]
            assert sorted(m["content"] for m in asked) == sorted(reply_of)
            for index, message in enumerate(stored):
                if message["role"] == "user" and message["content"] in reply_of:
                    assert stored[index + 1]["id"] == reply_of[message["content"]]
            # Both processes did answer.
            assert {m["content"].split("-")[0] for m in asked} == {"one", "two"}
    finally:
        for process in processes:
            await asyncio.to_thread(stop_process, process)
