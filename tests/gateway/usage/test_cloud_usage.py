"""Requests that overflow to the cloud upstream are usage too: their rows say route `cloud`, with
the cloud model and the cloud's token counts, and the usage report counts them as cloud
requests. A second simulator process stands in for the cloud."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
from sqlalchemy import select

from gateway.db import create_engine, create_session_factory
from gateway.usage.models import UsageRecord
from tests.helpers.polling import eventually
from tests.helpers.proxy import sim_profile, simulator_process
from tests.helpers.quota import (
    ADMIN_PASSWORD,
    bearer,
    chat,
    chat_body,
    create_key,
    create_user,
    login,
    quota_gateway,
    quota_settings,
    sse_events,
)

pytestmark = pytest.mark.postgres

CLOUD_KEY = "CLOUD-KEY-for-usage-tests"
# The local engine streams 20 tokens a second: a 400-token stream holds its only slot.
PROFILES = {"sim-a": sim_profile("sim-a", "--tokens-per-second", "20")}


async def _rows(database_url: str) -> list[UsageRecord]:
    engine = create_engine(database_url, pool_size=1)
    try:
        async with create_session_factory(engine)() as session:
            return list(await session.scalars(select(UsageRecord).order_by(UsageRecord.id)))
    finally:
        await engine.dispose()


async def _cloud_requests(cloud: str) -> int:
    # The stand-in cloud has an API key: its test routes want it as well.
    async with httpx.AsyncClient(headers={"Authorization": f"Bearer {CLOUD_KEY}"}) as client:
        stats = (await client.get(f"{cloud}/simulator/stats")).json()
    return int(stats["requests_total"])


async def test_overflowed_requests_are_recorded_as_cloud_usage(pg_url: str) -> None:
    async with simulator_process("--model", "cloud-model", "--api-key", CLOUD_KEY) as cloud:
        settings = quota_settings(
            pg_url,
            profiles=PROFILES,
            OPENAI_API_KEY=CLOUD_KEY,
            OPENAI_BASE_URL=f"{cloud}/v1",
            CLOUD_MODEL="cloud-model",
            MAX_QUEUE_SIZE=1,
            USAGE_FLUSH_INTERVAL_S=0.1,
        )
        async with quota_gateway(settings) as gw:
            http = gw.http
            alice = await create_user(http, "alice")
            key = await create_key(http, "alice")
            admin_token = await login(http, "admin", ADMIN_PASSWORD)
            credential = bearer(key["key"])

            body = chat_body(max_tokens=400, stream=True)
            async with http.stream(
                "POST", "/v1/chat/completions", json=body, headers=credential
            ) as held:
                assert held.status_code == 200
                assert held.headers["x-gateway-route"] == "local"
                # The only local slot is taken: these go to the cloud at once.
                plain = await chat(http, credential, max_tokens=5)
                streamed = await chat(http, credential, max_tokens=7, stream=True)
                held_id = held.headers["x-request-id"]
            # Leaving the block disconnected the held stream, freeing the local slot.

            async def everything() -> dict[str, Any] | None:
                reply = await http.get("/admin/api/usage?days=1", headers=bearer(admin_token))
                assert reply.status_code == 200, reply.text
                report = dict(reply.json())
                return report if report["totals"]["requests"] >= 3 else None

            report: dict[str, Any] = await eventually(everything, timeout_s=15)
            lb = (await http.get("/lb/status", headers=credential)).json()
        cloud_served = await _cloud_requests(cloud)
    for reply in (plain, streamed):
        assert reply.status_code == 200, reply.text
        assert reply.headers["x-gateway-route"] == "cloud"
    assert plain.json()["model"] == "cloud-model"
    assert sse_events(streamed)[-1] == "[DONE]"
    prompt = plain.json()["usage"]["prompt_tokens"]
    assert lb["overflow_count"] == 2
    assert cloud_served == 2

    totals = report["totals"]
    assert (totals["requests"], totals["cloud_requests"]) == (3, 2)
    assert {m["model"]: m["requests"] for m in report["by_model"]} == {
        "cloud-model": 2,
        "sim-a": 1,
    }
    assert {u["username"]: u["requests"] for u in report["by_user"]} == {"alice": 3}

    rows = {record.request_id: record for record in await _rows(pg_url)}
    assert set(rows) == {plain.headers["x-request-id"], streamed.headers["x-request-id"], held_id}
    for reply, completion in ((plain, 5), (streamed, 7)):
        row = rows[reply.headers["x-request-id"]]
        assert (row.route, row.model, row.status_code) == ("cloud", "cloud-model", 200)
        assert (str(row.user_id), str(row.api_key_id)) == (alice["id"], key["id"])
        assert (row.prompt_tokens, row.completion_tokens) == (prompt, completion)
    assert (rows[held_id].route, rows[held_id].model) == ("local", "sim-a")
