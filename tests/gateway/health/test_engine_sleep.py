"""Readiness never disagrees with what the engine does: an engine put to sleep (vLLM's sleep
contract, here a simulator engine called directly with its key) is not ready, requests get a
clear 503 from the gateway, and once woken all is as before."""

from __future__ import annotations

import httpx

from tests.helpers.polling import eventually
from tests.helpers.proxy import HELLO, gateway, gateway_settings, sim_profile

CHAT = {"messages": HELLO, "max_tokens": 4}


async def test_an_engine_put_to_sleep_is_not_ready_until_it_is_woken() -> None:
    async with gateway(gateway_settings({"sleepy": sim_profile("sim")}, "sleepy")) as gw:
        engine_url = await gw.wait_ready()
        assert (await gw.http.get("/health/ready")).status_code == 200
        async with httpx.AsyncClient(base_url=engine_url, timeout=10) as engine:
            # The sleep routes are the engine's, behind its key: nobody else may use them.
            assert (await engine.post("/sleep", params={"level": "1"})).status_code == 401
            slept = await engine.post("/sleep", params={"level": "1"}, headers=gw.engine_headers())
            assert slept.status_code == 200, slept.text
            asleep_ready = await gw.http.get("/health/ready")
            asleep_chat = await gw.http.post("/v1/chat/completions", json=CHAT)
            asleep_stream = await gw.http.post(
                "/v1/chat/completions", json={**CHAT, "stream": True}
            )
            status = await gw.engine_status()
            woke = await engine.post("/wake_up", headers=gw.engine_headers())
            assert woke.status_code == 200, woke.text

        async def ready_again() -> httpx.Response | None:
            response = await gw.http.get("/health/ready")
            return response if response.status_code == 200 else None

        awake_ready = await eventually(ready_again, 10)
        awake_chat = await gw.http.post("/v1/chat/completions", json=CHAT)

    assert asleep_ready.status_code == 503
    assert asleep_ready.headers["retry-after"]
    check = asleep_ready.json()["checks"]["engine"]
    assert (check["status"], check["code"]) == ("down", "engine_asleep")
    assert check["detail"] == "sim: the engine is asleep"
    # The gateway says it itself, at once: nothing is sent to the sleeping engine.
    for refused in (asleep_chat, asleep_stream):
        assert refused.status_code == 503, refused.text
        assert refused.headers["x-error-source"] == "gateway"
        assert refused.headers["retry-after"]
        error = refused.json()["error"]
        assert error["code"] == "engine_unavailable"
        assert error["message"] == "No engine is serving: the engine is asleep."
    # The admin sees it too: ready, but asleep.
    assert (status["state"], status["asleep"], status["failure"]) == (
        "ready",
        True,
        "engine_asleep",
    )
    assert awake_ready.json()["checks"]["engine"]["status"] == "up"
    assert awake_chat.status_code == 200, awake_chat.text
    assert awake_chat.headers["x-gateway-route"] == "local"
