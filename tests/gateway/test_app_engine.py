"""The app's lifespan owns the engine: the simulator starts with it and stops with it."""

from __future__ import annotations

import asyncio
import os

import pytest

from tests.infra.processes import pid_alive

from .conftest import make_settings, running_app


async def test_simulator_engine_starts_with_the_app_and_stops_with_it(sqlite_url: str) -> None:
    settings = make_settings(DATABASE_URL=sqlite_url, ENGINE="simulator")
    async with running_app(settings) as (app, client):
        manager = app.state.resources.manager
        first = await client.get("/health/ready")
        # Liveness answers while the engine is still loading.
        assert (await client.get("/health")).status_code == 200
        for _ in range(200):
            ready = await client.get("/health/ready")
            if ready.status_code == 200:
                break
            await asyncio.sleep(0.05)
        assert ready.status_code == 200, ready.text
        engine = ready.json()["checks"]["engine"]
        assert engine["status"] == "up"
        assert engine["detail"] == "simulator"
        assert manager.handle is not None
        pid = int(manager.handle.id)
        root = (await client.get("/")).json()
        assert root["engine"] == "simulator"
        assert root["engine_state"] == "ready"
    assert first.status_code in {200, 503}
    if first.status_code == 503:
        assert first.json()["checks"]["engine"]["status"] == "starting"
    assert not pid_alive(pid), "the engine process outlived the app"


async def test_dead_engine_makes_ready_503(sqlite_url: str) -> None:
    settings = make_settings(DATABASE_URL=sqlite_url, ENGINE="simulator")
    async with running_app(settings) as (app, client):
        manager = app.state.resources.manager
        for _ in range(200):
            if (await client.get("/health/ready")).status_code == 200:
                break
            await asyncio.sleep(0.05)
        assert manager.handle is not None
        os.killpg(int(manager.handle.id), 9)
        await asyncio.sleep(0.3)
        response = await client.get("/health/ready")
    assert response.status_code == 503
    assert response.json()["checks"]["engine"]["status"] == "down"


async def test_external_engine_that_is_down_is_reported(sqlite_url: str) -> None:
    settings = make_settings(
        DATABASE_URL=sqlite_url,
        ENGINE="auto",
        VLLM_BASE_URL="http://127.0.0.1:9/v1",
        ENGINE_STARTUP_TIMEOUT_S=0.5,
    )
    async with running_app(settings) as (_, client):
        await asyncio.sleep(1.0)
        response = await client.get("/health/ready")
    assert response.status_code == 503
    engine = response.json()["checks"]["engine"]
    assert engine["status"] == "down"
    assert "not serving after" in engine["detail"]


@pytest.mark.parametrize("mode", ["none"])
async def test_engine_none_is_not_required(sqlite_url: str, mode: str) -> None:
    async with running_app(make_settings(DATABASE_URL=sqlite_url, ENGINE=mode)) as (_, client):
        response = await client.get("/health/ready")
    assert response.status_code == 200
    assert response.json()["checks"]["engine"]["required"] is False
