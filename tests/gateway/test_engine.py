"""The app's lifespan owns the engine: the simulator starts with it and stops with it."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path
from typing import Any

import pytest
import yaml

from orchestrator.gpus import gpu_reader
from orchestrator.manager import EngineState
from orchestrator.planner import plan_profile
from orchestrator.profiles import ProfileRegistry
from tests.helpers.app import make_settings, running_app
from tests.helpers.polling import eventually
from tests.helpers.processes import pid_alive
from tests.helpers.profiles import llama_70b

GPU_SNAPSHOT = Path(__file__).parents[1] / "fixtures" / "gpu" / "dual_rtx3090.json"
ADMIN_KEY = "sk-admin-engine-test-4e7b2c9d1a"
ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
TOO_BIG = "llama-3-70b"
CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}


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
        # Before the manager's watch notices, the probe finds the engine unreachable ("down");
        # once it has, the engine is restarting ("starting", code engine_restarting). Either way
        # the gateway is not ready; wait for the watch so the assertion is not a race.
        for _ in range(200):
            if manager.state is not EngineState.READY:
                break
            await asyncio.sleep(0.05)
        response = await client.get("/health/ready")
    assert response.status_code == 503
    engine = response.json()["checks"]["engine"]
    assert engine["status"] == "starting", engine
    assert engine["code"] == "engine_restarting", engine


async def test_external_engine_that_is_down_is_reported(sqlite_url: str) -> None:
    settings = make_settings(
        DATABASE_URL=sqlite_url,
        ENGINE="auto",
        VLLM_BASE_URL="http://127.0.0.1:9/v1",
        ENGINE_STARTUP_TIMEOUT_S=0.5,
    )
    async with running_app(settings) as (app, client):
        manager = app.state.resources.manager
        # The start times out after 0.5 s; wait for its outcome rather than a fixed time.
        await eventually(lambda: manager.status().error is not None, 30)
        response = await client.get("/health/ready")
        admin_error = manager.status().error
    assert response.status_code == 503
    engine = response.json()["checks"]["engine"]
    assert engine["status"] == "down"
    # The public sees the stable reason and its code; the detail is the admin's.
    assert engine["code"] == "engine_start_failed"
    assert engine["detail"] == "external: the engine failed to start"
    assert "not serving after" in admin_error


@pytest.mark.parametrize("mode", ["none"])
async def test_engine_none_is_not_required(sqlite_url: str, mode: str) -> None:
    async with running_app(make_settings(DATABASE_URL=sqlite_url, ENGINE=mode)) as (_, client):
        response = await client.get("/health/ready")
    assert response.status_code == 200
    assert response.json()["checks"]["engine"]["required"] is False


def _profiles_whose_default_does_not_fit(tmp_path: Path) -> Path:
    """A default profile far too big for the recorded 2 x 24 GiB GPUs, and the simulator."""
    path = tmp_path / "model_profiles.yml"
    path.write_text(
        yaml.safe_dump(
            {
                "default": TOO_BIG,
                "profiles": {
                    TOO_BIG: llama_70b(TOO_BIG),
                    "simulator": {
                        "display_name": "Engine simulator",
                        "engine": "simulator",
                        "runtime": "process",
                        "served_model_name": "simulator",
                    },
                },
            }
        )
    )
    return path


def _planner_reasons(profiles: Path) -> tuple[str, ...]:
    """What the planner itself says about the default profile on the recorded GPUs."""
    verdict = plan_profile(
        ProfileRegistry(profiles).current.get(TOO_BIG), gpu_reader(GPU_SNAPSHOT).read()
    )
    assert not verdict.fits
    return verdict.reasons


def _engine_plans(output: str) -> list[dict[str, Any]]:
    """The engine_plan events among the JSON log lines."""
    events = []
    for line in output.splitlines():
        if line.startswith("{") and '"engine_plan"' in line:
            events.append(json.loads(line))
    return [e for e in events if e.get("event") == "engine_plan"]


async def test_production_auto_never_starts_the_simulator_and_says_why_everywhere(
    sqlite_url: str, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    profiles = _profiles_whose_default_does_not_fit(tmp_path)
    settings = make_settings(
        DATABASE_URL=sqlite_url,
        ENGINE="auto",
        MODEL_PROFILES=str(profiles),
        GPU_SNAPSHOT=str(GPU_SNAPSHOT),
        ADMIN_API_KEY=ADMIN_KEY,
        LOG_LEVEL="INFO",
    )
    async with running_app(settings) as (app, client):
        manager = app.state.resources.manager
        # A simulator started by mistake would be on its way (a job, a handle) by now.
        await asyncio.sleep(0.5)
        assert manager.current_job is None
        assert manager.handle is None
        assert manager.spec is None
        ready = await client.get("/health/ready")
        unnamed = await client.post("/v1/chat/completions", json=CHAT)
        named = await client.post("/v1/chat/completions", json={**CHAT, "model": TOO_BIG})
        status = (await client.get("/api/models/status", headers=ADMIN)).json()
        # A later start of a profile that fits clears the reason (an explicit switch here).
        switched = await client.post(
            "/api/models/switch", json={"profile_id": "simulator"}, headers=ADMIN
        )
        assert switched.status_code == 202, switched.text
        for _ in range(400):
            after = await client.get("/health/ready")
            if after.status_code == 200:
                break
            await asyncio.sleep(0.05)
        status_after = (await client.get("/api/models/status", headers=ADMIN)).json()

    assert ready.status_code == 503
    engine = ready.json()["checks"]["engine"]
    assert (engine["status"], engine["required"]) == ("down", True)
    reason = engine["detail"]
    assert f"default profile {TOO_BIG} cannot run here" in reason
    for planner_reason in _planner_reasons(profiles):
        assert planner_reason in reason
    assert "ENGINE=simulator" in reason
    assert status["engine"]["state"] == "idle"
    assert status["engine"]["error"] == reason
    for response in (unnamed, named):
        assert response.status_code == 503, response.text
        error = response.json()["error"]
        assert error["code"] == "engine_unavailable"
        assert reason in error["message"]
        assert response.headers["x-error-source"] == "gateway"
        assert "retry-after" in response.headers
    # Said once in the log, as a warning, with the same reason.
    plans = _engine_plans("\n".join(capfd.readouterr()))
    assert [(p["level"], p["reason"]) for p in plans] == [("warning", reason)]

    assert after.status_code == 200, after.text
    assert after.json()["checks"]["engine"]["detail"] == "simulator"
    assert status_after["engine"]["error"] is None


async def test_development_auto_runs_the_simulator_and_says_so(
    sqlite_url: str, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    profiles = _profiles_whose_default_does_not_fit(tmp_path)
    settings = make_settings(
        DATABASE_URL=sqlite_url,
        ENVIRONMENT="development",
        ENGINE="auto",
        MODEL_PROFILES=str(profiles),
        GPU_SNAPSHOT=str(GPU_SNAPSHOT),
        LOG_FORMAT="json",
        LOG_LEVEL="INFO",
    )
    async with running_app(settings) as (app, client):
        for _ in range(400):
            ready = await client.get("/health/ready")
            if ready.status_code == 200:
                break
            await asyncio.sleep(0.05)
        served = app.state.resources.manager.status()
    assert ready.status_code == 200, ready.text
    assert ready.json()["checks"]["engine"]["detail"] == "simulator"
    assert served.profile_id == "simulator"
    plans = _engine_plans("\n".join(capfd.readouterr()))
    assert len(plans) == 1
    assert plans[0]["level"] == "info"
    assert plans[0]["reason"].startswith(f"{TOO_BIG} cannot run here")
    assert plans[0]["reason"].endswith("running the engine simulator")
