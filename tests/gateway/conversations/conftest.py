"""Conversation tests: a served gateway with auth on, real Postgres, the simulator engine."""

from __future__ import annotations

import json
from typing import Any

import httpx

from tests.gateway.quota.conftest import bearer, pg_url  # noqa: F401 - the fixture

__all__ = ["bearer", "chat", "conversation", "messages", "stream_text"]


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
