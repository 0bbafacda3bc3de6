"""Usage routes through the running app on real Postgres; the recorder runs in the lifespan."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy import func, select

from gateway.auth import service as auth_service
from gateway.db import create_engine, create_session_factory, utcnow
from gateway.usage.models import UsageRecord
from gateway.users.models import User
from tests.gateway.usage.test_service import seed_usage
from tests.helpers.app import make_settings, running_app

pytestmark = pytest.mark.postgres

ADMIN_KEY = "adm-" + "Q7x2Lp9Zr4Tw8Ks1"
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}


@pytest.fixture
async def gateway(pg_url: str) -> AsyncIterator[tuple[FastAPI, httpx.AsyncClient]]:
    settings = make_settings(DATABASE_URL=pg_url, REQUIRE_AUTH=True, ADMIN_API_KEY=ADMIN_KEY)
    async with running_app(settings) as (app, client):
        yield app, client


async def _token_for(app: FastAPI, user: User) -> dict[str, str]:
    state = app.state.resources
    async with state.session_factory() as session:
        pair = await auth_service.issue_tokens(session=session, settings=state.settings, user=user)
    return {"Authorization": f"Bearer {pair.access_token}"}


async def test_admin_usage_matches_the_seed_route(
    gateway: tuple[FastAPI, httpx.AsyncClient],
) -> None:
    app, client = gateway
    await seed_usage(app.state.resources.session_factory, utcnow())
    reply = await client.get("/admin/api/usage?days=7", headers=ADMIN)
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert body["days"] == 7
    assert len(body["by_day"]) == 7
    totals = body["totals"]
    assert (totals["requests"], totals["prompt_tokens"], totals["completion_tokens"]) == (
        6,
        140,
        70,
    )
    assert (totals["errors"], totals["cloud_requests"], totals["avg_duration_ms"]) == (2, 1, 125.0)
    assert {u["username"]: u["requests"] for u in body["by_user"]} == {
        "alice": 4, "bob": 1, None: 1,
    }  # fmt: skip
    assert {k["prefix"]: k["requests"] for k in body["by_key"]} == {
        "sk-vcg-k0": 2, "sk-vcg-k1": 1, "sk-vcg-k2": 1, None: 2,
    }  # fmt: skip
    assert {m["model"]: m["requests"] for m in body["by_model"]} == {"tiny": 3, "big": 2, None: 1}
    assert (await client.get("/admin/api/usage", headers=ADMIN)).json()["days"] == 7
    assert (await client.get("/admin/api/usage?days=8", headers=ADMIN)).json()["totals"][
        "requests"
    ] == 7


async def test_days_outside_1_to_366_are_a_400(gateway: tuple[FastAPI, httpx.AsyncClient]) -> None:
    _, client = gateway
    for days in ("0", "-1", "367", "abc", "7.5"):
        reply = await client.get(f"/admin/api/usage?days={days}", headers=ADMIN)
        assert reply.status_code == 400, days
        assert reply.json()["error"]["param"] == "days"
    assert (await client.get("/admin/api/usage?days=366", headers=ADMIN)).status_code == 200
    assert (await client.get("/admin/api/usage?days=1", headers=ADMIN)).status_code == 200


async def test_users_see_only_their_own_usage(gateway: tuple[FastAPI, httpx.AsyncClient]) -> None:
    app, client = gateway
    ids = await seed_usage(app.state.resources.session_factory, utcnow())
    as_bob = await _token_for(app, ids["bob"])
    mine = await client.get("/api/usage?days=7", headers=as_bob)
    assert mine.status_code == 200, mine.text
    body = mine.json()
    assert body["totals"]["requests"] == 1
    assert body["totals"]["prompt_tokens"] == 100
    assert [u["username"] for u in body["by_user"]] == ["bob"]
    assert (await client.get("/api/usage?days=0", headers=as_bob)).status_code == 400
    assert (await client.get("/admin/api/usage", headers=as_bob)).status_code == 403
    assert (await client.get("/api/usage")).status_code == 401
    assert (await client.get("/admin/api/usage")).status_code == 401


async def test_the_lifespan_runs_the_recorder_and_flushes_it_at_shutdown(pg_url: str) -> None:
    settings = make_settings(DATABASE_URL=pg_url, USAGE_FLUSH_INTERVAL_S=3600)
    async with running_app(settings) as (app, _):
        recorder = app.state.resources.usage
        for i in range(5):
            recorder.record(
                user_id=None, key_id=None, endpoint="/v1/completions", model="tiny",
                status_code=200, duration_ms=3.0, usage={"prompt_tokens": 1}, request_id=str(i),
            )  # fmt: skip
        assert recorder.pending == 5
        await asyncio.sleep(0)
    assert (recorder.written, recorder.pending) == (5, 0)
    engine = create_engine(pg_url)
    try:
        async with create_session_factory(engine)() as session:
            assert await session.scalar(select(func.count()).select_from(UsageRecord)) == 5
    finally:
        await engine.dispose()
