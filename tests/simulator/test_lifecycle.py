"""The simulator's engine life as vLLM's: the sleep contract (behind the engine's key), and an
engine that crashes soon after it starts serving (`--die-after-seconds`)."""

from __future__ import annotations

import asyncio
import sys
import time

import httpx

from simulator import SimulatorConfig, create_simulator_app
from tests.helpers.ports import free_port

KEY = "sim-key-for-sleep-tests-0123456789"
BEARER = {"Authorization": f"Bearer {KEY}"}
CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


def _client(api_key: str | None = KEY) -> httpx.AsyncClient:
    app = create_simulator_app(SimulatorConfig(model="sim", api_key=api_key))
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://sim")


async def test_the_sleep_routes_need_the_engine_key_like_v1() -> None:
    async with _client() as sim:
        for method, path in (("POST", "/sleep"), ("POST", "/wake_up"), ("GET", "/is_sleeping")):
            refused = await sim.request(method, path)
            assert refused.status_code == 401, path
            wrong = await sim.request(method, path, headers={"Authorization": "Bearer nope"})
            assert wrong.status_code == 401, path
        # Nobody without the key put it to sleep.
        assert (await sim.get("/is_sleeping", headers=BEARER)).json() == {"is_sleeping": False}
        # /health stays open, as in vLLM.
        assert (await sim.get("/health")).status_code == 200


async def test_sleep_and_wake_up_answer_as_vllm_does() -> None:
    async with _client() as sim:
        # Level 1: one /wake_up brings it all back (level 2 also needs its weights reloaded:
        # test_sleep.py).
        slept = await sim.post("/sleep", params={"level": "1"}, headers=BEARER)
        assert (slept.status_code, slept.json()) == (200, {"status": "sleeping", "level": 1})
        assert (await sim.get("/is_sleeping", headers=BEARER)).json() == {"is_sleeping": True}
        # Asleep: health and the model list still answer, completions do not.
        assert (await sim.get("/health")).status_code == 200
        assert (await sim.get("/v1/models", headers=BEARER)).status_code == 200
        asleep = await sim.post("/v1/chat/completions", json=CHAT, headers=BEARER)
        assert asleep.status_code == 503
        woke = await sim.post("/wake_up", headers=BEARER)
        assert (woke.status_code, woke.json()) == (200, {"status": "awake", "tags": None})
        assert (await sim.get("/is_sleeping", headers=BEARER)).json() == {"is_sleeping": False}
        served = await sim.post("/v1/chat/completions", json=CHAT, headers=BEARER)
        assert served.status_code == 200


async def test_without_a_key_the_sleep_routes_are_open_as_in_vllm() -> None:
    async with _client(api_key=None) as sim:
        assert (await sim.post("/sleep")).status_code == 200
        assert (await sim.get("/is_sleeping")).json() == {"is_sleeping": True}


async def test_die_after_seconds_serves_then_exits_abruptly() -> None:
    port = free_port()
    process = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "simulator", "--host", "127.0.0.1", "--port", str(port)),
        *("--model", "sim", "--die-after-seconds", "1"),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        served_at = None
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=2) as client:
            deadline = time.monotonic() + 15
            while served_at is None and time.monotonic() < deadline:
                try:
                    if (await client.post("/v1/chat/completions", json=CHAT)).status_code == 200:
                        served_at = time.monotonic()
                except httpx.TransportError:
                    await asyncio.sleep(0.05)
        assert served_at is not None, "it never served"
        code = await asyncio.wait_for(process.wait(), 10)
        assert process.stdout is not None
        output = (await process.stdout.read()).decode()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert code == 1
    assert "--die-after-seconds 1 elapsed; exiting the process abruptly" in output
