"""The simulator's sleep contract as vLLM's: levels, the level-2 wake (weights, reload_weights,
KV cache), sleep and wake delays, and the simulated GPU memory /metrics reports, which agrees
with the gateway's placement ledger."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from orchestrator.placement import SLEEP_RESIDUAL_BYTES, Claim, Ledger
from simulator import SimulatorConfig, create_simulator_app
from simulator.__main__ import config_from_args
from simulator.config import DEFAULT_SLEEP_RESIDUAL_BYTES
from tests.helpers.metrics import Scrape
from tests.helpers.proxy import simulator_process

GIB = 1024**3
KEY = "sim-key-for-sleep-tests-0123456789"
BEARER = {"Authorization": f"Bearer {KEY}"}
CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
RELOAD = {"method": "reload_weights"}
# A 20 GiB claim: 1.5 GiB stays asleep, 8 GiB of it are the weights.
CLAIM = 20 * GIB
WEIGHTS = 8 * GIB


@pytest.fixture
async def sim() -> AsyncIterator[httpx.AsyncClient]:
    """An in-process simulator with a key, a 20 GiB claim and 8 GiB of weights."""
    config = SimulatorConfig(
        model="sim", api_key=KEY, gpu_memory_bytes=CLAIM, weights_bytes=WEIGHTS, test_routes=True
    )
    app = create_simulator_app(config)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://sim", headers=BEARER) as c:
        yield c


async def memory(client: httpx.AsyncClient) -> dict[str, float]:
    """The simulated memory series of /metrics, by short name."""
    scrape = Scrape((await client.get("/metrics")).text)
    names = ("claimed", "allocated", "freed_by_sleep")
    values = {name: scrape.value(f"simulator_gpu_memory_{name}_bytes") for name in names}
    values["cpu_backup"] = scrape.value("simulator_cpu_memory_weights_backup_bytes")
    values["level"] = scrape.value("simulator_sleep_level")
    return values


async def chat_status(client: httpx.AsyncClient) -> tuple[int, str]:
    """Status and error message (if any) of a small chat completion."""
    response = await client.post("/v1/chat/completions", json=CHAT)
    body: dict[str, Any] = response.json()
    return response.status_code, str(body.get("message", ""))


async def test_level_1_leaves_the_residual_and_one_wake_brings_everything_back(
    sim: httpx.AsyncClient,
) -> None:
    awake = await memory(sim)
    assert awake == {
        "claimed": CLAIM,
        "allocated": CLAIM,
        "freed_by_sleep": 0,
        "cpu_backup": 0,
        "level": 0,
    }
    assert (await sim.post("/sleep", params={"level": "1"})).json() == {
        "status": "sleeping",
        "level": 1,
    }
    asleep = await memory(sim)
    assert (await chat_status(sim))[0] == 503
    woke = await sim.post("/wake_up")
    assert woke.json() == {"status": "awake", "tags": None}
    assert await memory(sim) == awake
    assert (await chat_status(sim))[0] == 200

    # What sleep freed is everything but the residual; the weights wait in host RAM.
    assert asleep == {
        "claimed": CLAIM,
        "allocated": SLEEP_RESIDUAL_BYTES,
        "freed_by_sleep": CLAIM - SLEEP_RESIDUAL_BYTES,
        "cpu_backup": WEIGHTS,
        "level": 1,
    }
    # The gateway's ledger counts the same per GPU, awake and asleep.
    ledger = Ledger((Claim("sim", gpu_ids=(0,), bytes_per_gpu=CLAIM),))
    assert ledger.held_on(0) == awake["allocated"]
    assert ledger.asleep("sim").held_on(0) == asleep["allocated"]


async def test_level_2_wakes_its_weights_reloads_them_then_wakes_the_kv_cache(
    sim: httpx.AsyncClient,
) -> None:
    assert (await sim.post("/sleep", params={"level": "2"})).status_code == 200
    asleep = await memory(sim)
    # The weights' memory first: still asleep as a whole, and serving nothing.
    weights = await sim.post("/wake_up", params={"tags": "weights"})
    assert weights.json() == {"status": "sleeping", "tags": ["weights"]}
    assert (await sim.get("/is_sleeping")).json() == {"is_sleeping": True}
    with_weights = await memory(sim)
    assert (await chat_status(sim))[0] == 503
    reloaded = await sim.post("/collective_rpc", json=RELOAD)
    assert (reloaded.status_code, reloaded.json()) == (200, {"results": [None]})
    kv_cache = await sim.post("/wake_up", params={"tags": "kv_cache"})
    assert kv_cache.json() == {"status": "awake", "tags": ["kv_cache"]}
    assert (await sim.get("/is_sleeping")).json() == {"is_sleeping": False}
    assert (await memory(sim))["allocated"] == CLAIM
    assert (await chat_status(sim))[0] == 200

    # Level 2 keeps nothing in host RAM; the weights come back before the KV cache.
    assert (asleep["allocated"], asleep["cpu_backup"], asleep["level"]) == (
        SLEEP_RESIDUAL_BYTES,
        0,
        2,
    )
    assert (with_weights["allocated"], with_weights["level"]) == (
        SLEEP_RESIDUAL_BYTES + WEIGHTS,
        2,
    )


async def test_after_level_2_nothing_is_served_until_the_weights_are_reloaded(
    sim: httpx.AsyncClient,
) -> None:
    assert (await sim.post("/sleep", params={"level": "2"})).status_code == 200
    # Reloading into memory that is asleep is refused and changes nothing.
    early = await sim.post("/collective_rpc", json=RELOAD)
    assert early.status_code == 409
    assert "POST /wake_up?tags=weights before reload_weights" in early.json()["message"]
    # A plain wake brings all the memory back, as in vLLM, but not the weights themselves.
    assert (await sim.post("/wake_up")).json() == {"status": "awake", "tags": None}
    assert (await sim.get("/is_sleeping")).json() == {"is_sleeping": False}
    status, message = await chat_status(sim)
    assert status == 503
    assert "reload_weights" in message
    stats = (await sim.get("/simulator/stats")).json()
    assert (stats["weights_discarded"], stats["sleep_level"]) == (True, 0)
    assert (await sim.post("/collective_rpc", json=RELOAD)).status_code == 200
    assert (await chat_status(sim))[0] == 200
    # Level 1 never discards them.
    assert (await sim.post("/sleep", params={"level": "1"})).status_code == 200
    assert (await sim.post("/wake_up")).status_code == 200
    assert (await chat_status(sim))[0] == 200


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        (b"not json", 400, "JSON decode error"),
        (b"[]", 400, "Request body must be a JSON object"),
        (b"{}", 400, "Missing 'method' in request body"),
        (b'{"method": 7}', 400, "'method' must be a string"),
        (b'{"method": "shutdown"}', 400, "'shutdown' is not simulated"),
    ],
)
async def test_collective_rpc_refuses_what_it_does_not_simulate(
    sim: httpx.AsyncClient, body: bytes, status: int, message: str
) -> None:
    response = await sim.post("/collective_rpc", content=body)
    assert response.status_code == status
    assert message in response.json()["message"]


async def test_unknown_wake_tags_and_calls_without_the_key_are_refused(
    sim: httpx.AsyncClient,
) -> None:
    assert (await sim.post("/sleep", params={"level": "1"})).status_code == 200
    bad = await sim.post("/wake_up", params={"tags": "weights,kv_cache"})
    assert bad.status_code == 400
    assert "unknown tags ['weights,kv_cache']" in bad.json()["message"]
    for path in ("/collective_rpc", "/wake_up"):
        refused = await sim.post(path, json=RELOAD, headers={"Authorization": "Bearer nope"})
        assert refused.status_code == 401, path
    assert (await sim.get("/is_sleeping")).json() == {"is_sleeping": True}
    both = await sim.post("/wake_up", params=[("tags", "weights"), ("tags", "kv_cache")])
    assert both.json() == {"status": "awake", "tags": ["weights", "kv_cache"]}


def test_the_residual_is_the_placement_figure_and_memory_settings_are_checked() -> None:
    assert DEFAULT_SLEEP_RESIDUAL_BYTES == SLEEP_RESIDUAL_BYTES
    config = config_from_args(["--gpu-memory-bytes", str(CLAIM)], env={})
    assert (config.gpu_memory_bytes, config.sleep_residual_bytes) == (CLAIM, SLEEP_RESIDUAL_BYTES)
    env = {"SIMULATOR_WAKE_DELAY_S": "1.5", "SIMULATOR_SLEEP_RESIDUAL_BYTES": str(GIB)}
    assert config_from_args([], env=env).wake_delay_s == 1.5
    assert config_from_args([], env=env).sleep_residual_bytes == GIB
    with pytest.raises(ValueError, match=r"weights_bytes .* must fit in gpu_memory_bytes"):
        SimulatorConfig(gpu_memory_bytes=4 * GIB, weights_bytes=3 * GIB)
    with pytest.raises(ValueError, match="sleep_delay_s must be >= 0"):
        SimulatorConfig(sleep_delay_s=-1)
    with pytest.raises(SystemExit):
        config_from_args(["--wake-delay-s", "-2"], env={})


async def test_a_real_process_takes_its_delays_and_reports_them() -> None:
    args = ("--model", "sim", "--api-key", KEY, "--tokens-per-second", "20")
    delays = ("--sleep-delay-s", "0.6", "--wake-delay-s", "0.4")
    sizes = ("--gpu-memory-bytes", str(CLAIM), "--weights-bytes", str(WEIGHTS))
    async with (
        simulator_process(*args, *delays, *sizes) as url,
        httpx.AsyncClient(base_url=url, headers=BEARER, timeout=10) as sim,
    ):
        # A stream is running when the sleep is asked for: counted (vLLM aborts or crashes it).
        stream = asyncio.ensure_future(
            sim.post("/v1/chat/completions", json={**CHAT, "max_tokens": 30, "stream": True})
        )
        await asyncio.sleep(0.3)
        started = time.monotonic()
        sleeping = asyncio.ensure_future(sim.post("/sleep", params={"level": "2"}))
        await asyncio.sleep(0.2)
        during = await sim.post("/v1/chat/completions", json=CHAT)  # while it falls asleep
        assert (await sleeping).status_code == 200
        slept_s = time.monotonic() - started
        await stream
        asleep = await memory(sim)

        started = time.monotonic()
        assert (await sim.post("/wake_up", params={"tags": "weights"})).status_code == 200
        weights_s = time.monotonic() - started
        started = time.monotonic()
        assert (await sim.post("/collective_rpc", json=RELOAD)).status_code == 200
        reload_s = time.monotonic() - started
        assert (await sim.post("/wake_up", params={"tags": "kv_cache"})).status_code == 200
        served = await sim.post("/v1/chat/completions", json=CHAT)
        scrape = Scrape((await sim.get("/metrics")).text)
        stats = (await sim.get("/simulator/stats")).json()

    assert during.status_code == 503
    assert slept_s >= 0.6
    assert weights_s >= 0.4
    assert reload_s >= 0.4
    assert (asleep["allocated"], asleep["freed_by_sleep"]) == (
        SLEEP_RESIDUAL_BYTES,
        CLAIM - SLEEP_RESIDUAL_BYTES,
    )
    assert served.status_code == 200
    assert scrape.value("simulator_gpu_memory_allocated_bytes") == CLAIM
    operation = "vllm:sleep_mode_operation_duration_seconds_count"
    assert scrape.value(operation, operation="sleep") == 1
    assert scrape.value(operation, operation="wake") == 2
    assert stats["sleeps_while_running"] == 1
