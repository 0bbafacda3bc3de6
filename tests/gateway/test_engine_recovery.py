"""A dead engine comes back, and its internals stay internal: the gateway with real simulator
engines, killed with SIGKILL or crashing on their own (`--die-after-seconds`).

- killed: the manager restarts it after a backoff, and chat works again; requests sent while it
  restarts wait for it and succeed;
- crashing right after every start: after ENGINE_RESTART_MAX restarts within the window it stays
  failed, a crash loop, said the same way by /api/models/status, /health/ready, the 503 of a
  request and the metrics;
- the engine's last log line (its port, its paths) is for admins only: a normal user's 503 and
  the public /health/ready carry a stable sentence and a code.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from typing import Any

import httpx

from tests.helpers.metrics import scrape
from tests.helpers.polling import eventually
from tests.helpers.proxy import AUTH, HELLO, Gateway, gateway, gateway_settings, sim_profile

CHAT = {"messages": HELLO, "max_tokens": 4}
ADMIN_PASSWORD = "adm1n-Pass-for-recovery-tests-2c7d"
USER_PASSWORD = "us3r-Pass-for-recovery-tests-6a1f"


def _kill_engine(gw: Gateway) -> int:
    """SIGKILL the engine's process group, as the OOM killer or `kill -9` would; its pid."""
    handle = gw.manager.handle
    assert handle is not None
    pid = int(handle.id)
    os.killpg(pid, signal.SIGKILL)
    return pid


async def _engine_when(gw: Gateway, state: str, **fields: Any) -> dict[str, Any]:
    """/api/models/status's engine once it is in `state` (with these field values)."""

    async def reached() -> dict[str, Any] | None:
        engine = await gw.engine_status()
        matches = engine["state"] == state and all(engine[k] == v for k, v in fields.items())
        return engine if matches else None

    engine: dict[str, Any] = await eventually(reached, 60)
    return engine


async def test_a_killed_engine_comes_back_and_chat_works_again() -> None:
    profile = "revive-killed"
    settings = gateway_settings(
        {profile: sim_profile("sim", "--log-level", "info")}, profile, ENGINE_RESTART_BACKOFF_S=0.2
    )
    async with gateway(settings) as gw:
        before = await gw.http.post("/v1/chat/completions", json=CHAT)
        old_url = await gw.wait_ready()
        pid = _kill_engine(gw)
        engine = await _engine_when(gw, "ready", restarts=1)
        after = await gw.http.post("/v1/chat/completions", json=CHAT)
        metrics = await scrape(gw.http)
        new_pid = int(gw.manager.handle.id)
    assert before.status_code == 200, before.text
    assert after.status_code == 200, after.text
    assert after.headers["x-gateway-route"] == "local"
    assert new_pid != pid
    # A fresh engine: new port (and API key), the same profile.
    assert engine["engine_url"] != old_url
    assert engine["profile_id"] == profile
    assert engine["recent_crashes"] == 1
    assert engine["error"] is None
    # The crash's log lines stay for the admin after the restart.
    assert any("SIMULATOR ready" in line for line in engine["logs"])
    assert metrics.value("gateway_engine_restarts_total", profile=profile) == 1
    assert metrics.value("gateway_engine_state", profile=profile, state="ready") == 1


async def test_requests_sent_while_it_restarts_wait_and_succeed() -> None:
    profile = "revive-held"
    settings = gateway_settings(
        {profile: sim_profile("sim")},
        profile,
        ENGINE_RESTART_BACKOFF_S=1.0,
        QUEUE_TIMEOUT_S=30,
    )
    async with gateway(settings) as gw:
        _kill_engine(gw)
        await _engine_when(gw, "restarting")
        ready = await gw.http.get("/health/ready")
        # Sent during the backoff: they wait for the restart instead of failing.
        sent_while = gw.manager.state.value
        whole, streamed = await asyncio.gather(
            gw.http.post("/v1/chat/completions", json=CHAT),
            gw.http.post("/v1/chat/completions", json={**CHAT, "stream": True}),
        )
        restarts = gw.manager.restart_counts()
    assert sent_while == "restarting"
    assert ready.status_code == 503
    check = ready.json()["checks"]["engine"]
    assert (check["status"], check["code"]) == ("starting", "engine_restarting")
    assert check["detail"] == "sim: the engine stopped unexpectedly and is being restarted"
    assert whole.status_code == 200, whole.text
    assert whole.headers["x-gateway-route"] == "local"
    assert whole.json()["choices"][0]["message"]["content"]
    assert streamed.status_code == 200, streamed.text
    assert streamed.text.rstrip().endswith("data: [DONE]")
    assert restarts == {profile: 1}


async def test_an_engine_that_crashes_right_after_start_ends_in_a_crash_loop() -> None:
    profile = "crash-loop"
    crashing = sim_profile("sim", "--die-after-seconds", "0.5")
    settings = gateway_settings(
        {profile: crashing},
        profile,
        ENGINE_RESTART_MAX=2,
        ENGINE_RESTART_WINDOW_S=120,
        ENGINE_RESTART_BACKOFF_S=0.1,
    )
    async with gateway(settings, wait=False) as gw:
        engine = await _engine_when(gw, "failed")
        await asyncio.sleep(0.5)  # nothing restarts it any more
        still = await gw.engine_status()
        ready = await gw.http.get("/health/ready")
        refused = await gw.http.post("/v1/chat/completions", json=CHAT)
        metrics = await scrape(gw.http)
    # The admin: what happened, how often, and the engine's own last words.
    assert engine["failure"] == "engine_crash_loop"
    assert engine["error"].startswith("crash loop: the engine crashed 3 times within 120s")
    assert "(at most 2 restarts)" in engine["error"]
    assert engine["restarts"] == 2
    assert engine["restart_limit"] == 2
    assert any("--die-after-seconds 0.5 elapsed" in line for line in engine["logs"])
    assert (still["state"], still["restarts"]) == ("failed", 2)
    # The public: not ready, with the code and the fixed sentence.
    assert ready.status_code == 503
    check = ready.json()["checks"]["engine"]
    assert (check["status"], check["code"]) == ("down", "engine_crash_loop")
    assert check["detail"] == (
        "sim: the engine crashed repeatedly and is not restarted again until an administrator acts"
    )
    # A request: refused at once, saying so.
    assert refused.status_code == 503
    error = refused.json()["error"]
    assert error["code"] == "engine_unavailable"
    assert error["message"] == (
        "No engine is serving: the engine crashed repeatedly and is not restarted again until "
        "an administrator acts."
    )
    assert refused.headers["x-error-source"] == "gateway"
    # Metrics: the restarts counted, the state failed.
    assert metrics.value("gateway_engine_restarts_total", profile=profile) == 2
    assert metrics.value("gateway_engine_state", profile=profile, state="failed") == 1


async def _login(http: httpx.AsyncClient, username: str, password: str) -> dict[str, str]:
    response = await http.post("/api/auth/login", json={"username": username, "password": password})
    assert response.status_code == 200, response.text
    return {"Authorization": f"Bearer {response.json()['access_token']}"}


async def test_engine_internals_reach_admins_only() -> None:
    profile = "internals"
    # At log level info the engine's last line is uvicorn's, naming its address.
    settings = gateway_settings(
        {profile: sim_profile("sim", "--log-level", "info")},
        profile,
        ENGINE_RESTART_MAX=0,
        REQUIRE_AUTH=True,
        ADMIN_PASSWORD=ADMIN_PASSWORD,
    )
    async with gateway(settings) as gw:
        engine_url = await gw.wait_ready()
        port = engine_url.rsplit(":", 1)[1]
        admin = await _login(gw.http, "admin", ADMIN_PASSWORD)
        created = await gw.http.post(
            "/admin/api/users",
            json={"username": "bob", "password": USER_PASSWORD, "role": "user"},
            headers=admin,
        )
        assert created.status_code == 201, created.text
        bob = await _login(gw.http, "bob", USER_PASSWORD)
        _kill_engine(gw)
        status = await _engine_when(gw, "failed")
        user_503 = await gw.http.post("/v1/chat/completions", json=CHAT, headers=bob)
        user_status = await gw.http.get("/api/models/status", headers=bob)
        public = await gw.http.get("/health/ready")
        admin_status = (await gw.http.get("/api/models/status", headers=admin)).json()["engine"]
        key_status = (await gw.http.get("/api/models/status", headers=AUTH)).json()["engine"]

    last_line = f"Uvicorn running on http://127.0.0.1:{port}"
    # The admin (a session or the admin key) sees the engine's last words and its log tail.
    for engine in (status, admin_status, key_status):
        assert last_line in engine["error"]
        assert any(last_line in line for line in engine["logs"])
        assert engine["failure"] == "engine_crashed"
    # A normal user may not read the admin status, and the 503 says only what is stable.
    assert user_status.status_code == 403
    assert user_503.status_code == 503
    assert user_503.json()["error"] == {
        "message": "No engine is serving: the engine stopped unexpectedly.",
        "type": "service_unavailable_error",
        "param": None,
        "code": "engine_unavailable",
    }
    assert public.status_code == 503
    check = public.json()["checks"]["engine"]
    assert check == {
        "status": "down",
        "required": True,
        "latency_ms": None,
        "detail": "sim: the engine stopped unexpectedly",
        "code": "engine_crashed",
    }
    for text in (user_503.text, public.text):
        for internal in ("Uvicorn", "127.0.0.1", f":{port}", str(settings.STATE_DIR)):
            assert internal not in text
        assert sys.executable not in text
