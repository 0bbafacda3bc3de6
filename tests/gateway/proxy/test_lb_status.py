"""GET /lb/status reports the load balancer's settings and live counts, with a cloud upstream
configured and without; with LB_ENABLED=false a configured cloud is never used.

The engines are simulator processes: the gateway's local one streams 20 tokens a second, so an
open stream holds a local slot for as long as the test keeps it; a second simulator, started by
the test, stands in for the cloud.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import httpx
import pytest

from tests.helpers.polling import eventually
from tests.helpers.proxy import (
    HELLO,
    Gateway,
    gateway,
    gateway_settings,
    sim_profile,
    simulator_process,
)

CLOUD_KEY = "CLOUD-KEY-lb-status"
SLOW = ("--tokens-per-second", "20")
PROFILES = {"sim": sim_profile("sim", *SLOW)}
# 400 tokens at 20 tokens/s: a stream that lasts until the test lets it go.
LONG_STREAM = {"messages": HELLO, "max_tokens": 400, "ignore_eos": True, "stream": True}
SHORT_BODY = {"messages": HELLO, "max_tokens": 2}
IDLE = {"current_requests": 0, "local_requests": 0, "cloud_requests": 0, "queue_depth": 0}


@pytest.fixture(scope="module")
async def cloud() -> AsyncIterator[str]:
    """The stand-in cloud: a simulator serving cloud-model behind an API key."""
    async with simulator_process("--model", "cloud-model", "--api-key", CLOUD_KEY, *SLOW) as url:
        yield url


def _cloud_settings(cloud: str, **extra: Any) -> Any:
    return gateway_settings(
        PROFILES,
        "sim",
        OPENAI_API_KEY=CLOUD_KEY,
        OPENAI_BASE_URL=f"{cloud}/v1",
        CLOUD_MODEL="cloud-model",
        **extra,
    )


async def _cloud_requests(cloud: str) -> int:
    # The stand-in cloud has an API key: its test routes want it as well.
    async with httpx.AsyncClient(headers={"Authorization": f"Bearer {CLOUD_KEY}"}) as client:
        stats = (await client.get(f"{cloud}/simulator/stats")).json()
    return int(stats["requests_total"])


@asynccontextmanager
async def _streams_held(gw: Gateway, count: int) -> AsyncIterator[list[str]]:
    """`count` long streams, opened one after the other and held until the block ends (their
    client leaves); yields the route each one got."""
    async with AsyncExitStack() as stack:
        routes = []
        for _ in range(count):
            response = await stack.enter_async_context(
                gw.http.stream("POST", "/v1/chat/completions", json=LONG_STREAM)
            )
            assert response.status_code == 200, await response.aread()
            routes.append(response.headers["x-gateway-route"])
        yield routes


async def _lb_is(gw: Gateway, **expected: Any) -> bool:
    lb = await gw.lb()
    return all(lb[name] == value for name, value in expected.items())


async def _when_idle(gw: Gateway) -> dict[str, Any]:
    """/lb/status once nothing runs or waits any more (a left stream is released shortly
    after its client goes)."""
    await eventually(lambda: _lb_is(gw, **IDLE))
    return await gw.lb()


def _subset(lb: dict[str, Any], expected: dict[str, Any]) -> dict[str, Any]:
    return {name: lb[name] for name in expected}


async def test_without_a_cloud_it_reports_local_slots_only() -> None:
    async with gateway(gateway_settings(PROFILES, "sim")) as gw:
        idle = await gw.lb()
        async with _streams_held(gw, 2) as routes:
            busy = await gw.lb()
        after = await _when_idle(gw)
    assert routes == ["local", "local"]
    assert idle == {
        "enabled": True,
        "max_queue_size": 4,  # MAX_QUEUE_SIZE's default
        "local_model": "sim",
        "cloud_model": None,
        **IDLE,
        "overflow_count": 0,
        "predicted_wait_s": 0.0,
        "engine_state": "ready",
    }
    assert _subset(busy, IDLE) == {**IDLE, "current_requests": 2, "local_requests": 2}
    assert busy["overflow_count"] == 0
    assert after["overflow_count"] == 0


async def test_with_a_cloud_it_reports_local_cloud_and_overflow(cloud: str) -> None:
    cloud_before = await _cloud_requests(cloud)
    async with gateway(_cloud_settings(cloud)) as gw:
        idle = await gw.lb()
        # The default four local slots fill up; the fifth stream overflows and stays open.
        async with _streams_held(gw, 5) as routes:
            busy = await gw.lb()
        after = await _when_idle(gw)
    assert routes == ["local"] * 4 + ["cloud"]
    assert (idle["enabled"], idle["max_queue_size"]) == (True, 4)
    assert (idle["local_model"], idle["cloud_model"]) == ("sim", "cloud-model")
    assert _subset(idle, IDLE) == IDLE
    assert idle["overflow_count"] == 0
    expected_busy = {"current_requests": 5, "local_requests": 4, "cloud_requests": 1}
    assert _subset(busy, IDLE) == {**IDLE, **expected_busy}
    assert busy["overflow_count"] == 1
    # The overflow count is a running total; the rest fall back to idle.
    assert after["overflow_count"] == 1
    assert await _cloud_requests(cloud) == cloud_before + 1


async def test_lb_disabled_a_saturated_local_queues_and_never_overflows(cloud: str) -> None:
    cloud_before = await _cloud_requests(cloud)
    settings = _cloud_settings(cloud, LB_ENABLED=False, MAX_QUEUE_SIZE=1, QUEUE_TIMEOUT_S=30)
    async with gateway(settings) as gw:
        async with _streams_held(gw, 1) as routes:
            queued = [
                asyncio.create_task(gw.http.post("/v1/chat/completions", json=SHORT_BODY))
                for _ in range(2)
            ]
            await eventually(lambda: _lb_is(gw, queue_depth=2))
            during = await gw.lb()
        responses = await asyncio.gather(*queued)
        after = await _when_idle(gw)
    assert routes == ["local"]
    assert (during["enabled"], during["max_queue_size"]) == (False, 1)
    # The configured cloud is shown, though a disabled load balancer does not use it.
    assert during["cloud_model"] == "cloud-model"
    assert _subset(during, IDLE) == {
        **IDLE,
        "current_requests": 1,
        "local_requests": 1,
        "queue_depth": 2,
    }
    assert [r.status_code for r in responses] == [200, 200]
    assert {r.headers["x-gateway-route"] for r in responses} == {"local"}
    assert {r.json()["model"] for r in responses} == {"sim"}
    assert (during["overflow_count"], after["overflow_count"]) == (0, 0)
    assert await _cloud_requests(cloud) == cloud_before


async def test_lb_disabled_no_engine_does_not_overflow(cloud: str) -> None:
    cloud_before = await _cloud_requests(cloud)
    settings = _cloud_settings(cloud, LB_ENABLED=False, ENGINE="none")
    async with gateway(settings, wait=False) as gw:
        response = await gw.http.post("/v1/chat/completions", json=SHORT_BODY)
        lb = await gw.lb()
    assert response.status_code == 503, response.text
    # Refused at once: with the load balancer off, an idle engine has no stand-in.
    assert response.json()["error"]["code"] == "engine_unavailable"
    assert response.headers["x-error-source"] == "gateway"
    assert "retry-after" in response.headers
    assert (lb["enabled"], lb["local_model"], lb["engine_state"]) == (False, None, "idle")
    assert lb["overflow_count"] == 0
    assert await _cloud_requests(cloud) == cloud_before
