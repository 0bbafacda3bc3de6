"""Conversations and /api/chat: requests, stored messages, a gateway process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx

from tests.helpers.app import TEST_SECRET
from tests.helpers.paths import REPO
from tests.helpers.quota import ADMIN_KEY, bearer

__all__ = [
    "bearer",
    "chat",
    "conversation",
    "engine_ready",
    "gateway_process",
    "messages",
    "stop_process",
    "stream_text",
]


async def chat(
    http: httpx.AsyncClient, token: str, *, headers: dict[str, str] | None = None, **body: Any
) -> httpx.Response:
    """POST /api/chat as `token` (a stream is read to its end)."""
    return await http.post(
        "/api/chat", json=body, headers={**bearer(token), **(headers or {})}, timeout=60
    )


async def conversation(http: httpx.AsyncClient, token: str, conversation_id: str) -> Any:
    """GET /api/conversations/{id} (all messages)."""
    reply = await http.get(
        f"/api/conversations/{conversation_id}", params={"limit": 1000}, headers=bearer(token)
    )
    assert reply.status_code == 200, reply.text
    return reply.json()


async def messages(http: httpx.AsyncClient, token: str, conversation_id: str) -> list[Any]:
    """The messages of a conversation, in order."""
    return list((await conversation(http, token, conversation_id))["messages"])


async def last_message(http: httpx.AsyncClient, token: str, conversation_id: str) -> Any:
    """The last message of a conversation (the reply, after a chat)."""
    return (await messages(http, token, conversation_id))[-1]


async def settled_reply(http: httpx.AsyncClient, token: str, conversation_id: str) -> Any:
    """The last message once it is no longer `streaming`, else None (for `eventually`)."""
    last = await last_message(http, token, conversation_id)
    return last if last["status"] != "streaming" else None


def stream_text(response: httpx.Response) -> tuple[str, list[Any]]:
    """The text of a relayed chat stream and its events (JSON decoded, '[DONE]' as is)."""
    events: list[Any] = []
    for line in response.text.splitlines():
        if line.startswith("data: "):
            data = line[len("data: ") :]
            events.append(data if data == "[DONE]" else json.loads(data))
    text = "".join(
        choice["delta"].get("content") or ""
        for event in events
        if isinstance(event, dict)
        for choice in event.get("choices", [])
    )
    return text, events


def gateway_process(
    database_url: str, state_dir: Path, port: int, profiles: Path, **env: str
) -> subprocess.Popen[bytes]:
    """`python -m gateway serve` on `port` with auth on, the simulator `sim-a` of `profiles`
    and no standard-tier limits; `env` adds or overrides variables."""
    values = {
        "PATH": os.environ.get("PATH", ""),
        "ENVIRONMENT": "production",
        "JWT_SECRET": TEST_SECRET,
        "DATABASE_URL": database_url,
        "ADMIN_API_KEY": ADMIN_KEY,
        "HOST": "127.0.0.1",
        "PORT": str(port),
        "STATE_DIR": str(state_dir),
        "MODEL_PROFILES": str(profiles),
        "DEFAULT_PROFILE": "sim-a",
        "ENGINE": "auto",
        "LOG_FORMAT": "json",
        "LOG_LEVEL": "WARNING",
        "CHAT_SAVE_INTERVAL_S": "0.2",
        "RATE_LIMIT_STANDARD_PER_MINUTE": "0",
        "RATE_LIMIT_STANDARD_PER_HOUR": "0",
        "RATE_LIMIT_STANDARD_TOKENS_PER_MINUTE": "0",
        **env,
    }
    return subprocess.Popen(
        [sys.executable, "-m", "gateway", "serve"],
        env=values,
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


def stop_process(process: subprocess.Popen[bytes] | None) -> None:
    """SIGTERM a process started here (SIGKILL when it lingers); nothing when it is gone."""
    if process is None or process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(10)


async def engine_ready(http: httpx.AsyncClient) -> bool:
    """True once the gateway behind `http` answers and its engine is ready."""
    try:
        reply = await http.get("/api/models/status", headers=bearer(ADMIN_KEY))
    except httpx.TransportError:
        return False
    return reply.status_code == 200 and reply.json()["engine"]["state"] == "ready"
