"""The Responses API, Anthropic's messages and rerank are metered and limited like chat: usage
rows from the engine's own counts (input/output tokens as prompt/completion), streams counted
at their end, the token budget spent by them, and a 429 in the route's own error shape."""

from __future__ import annotations

from typing import Any

import httpx
import orjson
import pytest
from sqlalchemy import select

from gateway.db import create_engine, create_session_factory
from gateway.usage.models import UsageRecord
from tests.helpers.polling import eventually
from tests.helpers.quota import bearer, create_key, quota_gateway, quota_settings

pytestmark = pytest.mark.postgres

IGNORE_EOS = {"ignore_eos": True}


async def _rows(database_url: str) -> dict[str, UsageRecord]:
    engine = create_engine(database_url, pool_size=1)
    try:
        async with create_session_factory(engine)() as session:
            records = await session.scalars(select(UsageRecord))
            return {record.request_id: record for record in records}
    finally:
        await engine.dispose()


def _events(text: str) -> list[tuple[str, str]]:
    """(name, data) of each named event of a stream's text."""
    found = []
    for block in text.split("\n\n"):
        lines = block.splitlines()
        name = next((line[7:] for line in lines if line.startswith("event: ")), "")
        data = next((line[6:] for line in lines if line.startswith("data: ")), "")
        if data:
            found.append((name, data))
    return found


async def test_new_routes_are_metered_with_the_engines_counts(pg_url: str) -> None:
    settings = quota_settings(pg_url, USAGE_FLUSH_INTERVAL_S=0.1)
    async with quota_gateway(settings) as gw:
        http = gw.http
        key = await create_key(http, "alice")
        auth = bearer(key["key"])
        replies: dict[str, tuple[str, int, int]] = {}

        whole = await http.post(
            "/v1/responses",
            json={"model": "sim-a", "input": "hello", "max_output_tokens": 6, **IGNORE_EOS},
            headers=auth,
        )
        assert whole.status_code == 200, whole.text
        usage = whole.json()["usage"]
        replies[whole.headers["x-request-id"]] = (
            "responses", usage["input_tokens"], usage["output_tokens"]
        )  # fmt: skip

        body = {"model": "sim-a", "input": "hello", "max_output_tokens": 4, "stream": True}
        async with http.stream(
            "POST", "/v1/responses", json={**body, **IGNORE_EOS}, headers=auth
        ) as streamed:
            text = "".join([chunk async for chunk in streamed.aiter_text()])
        final = _events(text)[-1]
        assert final[0] in ("response.completed", "response.incomplete")
        final_usage = orjson.loads(final[1])["response"]["usage"]
        replies[streamed.headers["x-request-id"]] = (
            "responses", final_usage["input_tokens"], final_usage["output_tokens"]
        )  # fmt: skip

        # Anthropic's SDKs send the key as x-api-key.
        anthropic_auth = {"x-api-key": key["key"]}
        message_body = {
            "model": "sim-a",
            "max_tokens": 5,
            "messages": [{"role": "user", "content": "hi"}],
        }
        message = await http.post("/v1/messages", json=message_body, headers=anthropic_auth)
        assert message.status_code == 200, message.text
        message_usage = message.json()["usage"]
        replies[message.headers["x-request-id"]] = (
            "messages", message_usage["input_tokens"], message_usage["output_tokens"]
        )  # fmt: skip

        async with http.stream(
            "POST", "/v1/messages", json={**message_body, "stream": True}, headers=anthropic_auth
        ) as streamed_message:
            events = _events("".join([chunk async for chunk in streamed_message.aiter_text()]))
        start = httpx.Response(200, content=events[0][1]).json()
        delta = next(
            httpx.Response(200, content=data).json()
            for name, data in events
            if name == "message_delta"
        )
        replies[streamed_message.headers["x-request-id"]] = (
            "messages",
            start["message"]["usage"]["input_tokens"],
            delta["usage"]["output_tokens"],
        )

        rerank = await http.post(
            "/v1/rerank",
            json={"model": "sim-a", "query": "cat", "documents": ["a cat", "a car"]},
            headers=auth,
        )
        assert rerank.status_code == 200, rerank.text
        rerank_usage = rerank.json().get("usage") or {}
        replies[rerank.headers["x-request-id"]] = (
            "rerank",
            rerank_usage.get("prompt_tokens", 0),
            0,
        )

        async def written() -> dict[str, UsageRecord] | None:
            rows = await _rows(pg_url)
            return rows if set(replies) <= set(rows) else None

        rows: dict[str, UsageRecord] = await eventually(written, timeout_s=10)
        for request_id, (endpoint, prompt, completion) in replies.items():
            row = rows[request_id]
            assert (row.endpoint, row.model, row.status_code) == (endpoint, "sim-a", 200)
            assert (row.prompt_tokens, row.completion_tokens) == (prompt, completion), endpoint
            assert str(row.api_key_id) == key["id"]
        assert all(replies[rid][2] > 0 for rid in replies if replies[rid][0] != "rerank")


BUDGET = 60


async def test_the_token_budget_is_spent_by_messages_and_refuses_in_anthropics_shape(
    pg_url: str,
) -> None:
    settings = quota_settings(
        pg_url,
        RATE_LIMIT_FREE_PER_MINUTE=100,
        RATE_LIMIT_FREE_PER_HOUR=100,
        RATE_LIMIT_FREE_TOKENS_PER_MINUTE=BUDGET,
    )
    async with quota_gateway(settings) as gw:
        http = gw.http
        key = await create_key(http, "tokens-team", tier="free")
        headers = {"x-api-key": key["key"]}
        body: dict[str, Any] = {
            "model": "sim-a",
            "max_tokens": 40,
            "messages": [{"role": "user", "content": "hi"}],
            "stream": True,
            **IGNORE_EOS,
        }

        async def send() -> httpx.Response:
            async with http.stream("POST", "/v1/messages", json=body, headers=headers) as reply:
                await reply.aread()
                return reply

        first = await send()
        assert first.status_code == 200
        assert first.headers["X-RateLimit-Limit-Tokens-Minute"] == str(BUDGET)

        async def refused() -> httpx.Response | None:
            reply = await send()
            return reply if reply.status_code == 429 else None

        denied: httpx.Response = await eventually(refused, timeout_s=15)
        error = denied.json()
        assert error["type"] == "error"
        assert error["error"]["type"] == "rate_limit_error"
        assert int(denied.headers["Retry-After"]) >= 1
        # Responses spend the same budget: refused as well, in OpenAI's shape.
        response = await http.post(
            "/v1/responses",
            json={"model": "sim-a", "input": "hi", "max_output_tokens": 5},
            headers=bearer(key["key"]),
        )
        assert response.status_code == 429
        assert response.json()["error"]["code"] == "token_rate_limit_exceeded"
