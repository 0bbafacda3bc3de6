"""Overflow to a cloud upstream (a second simulator stands in for it); queueing without one."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest

from tests.helpers.polling import eventually
from tests.helpers.proxy import (
    AUTH,
    HELLO,
    Gateway,
    gateway,
    gateway_settings,
    sim_profile,
    simulator_process,
)

CLOUD_KEY = "CLOUDKEY"
SLOW = ("--tokens-per-second", "20")
# 20 tokens at 20 tokens/s: about one second per request.
SLOW_BODY = {"messages": HELLO, "max_tokens": 20, "ignore_eos": True}
SHORT_BODY = {"messages": HELLO, "max_tokens": 2}


@pytest.fixture(scope="module")
async def cloud() -> AsyncIterator[str]:
    """The stand-in cloud: a simulator serving cloud-model and cloud-big behind an API key."""
    names = ("--served-model-name", "cloud-model", "cloud-big")
    async with simulator_process(
        "--model", "cloud-model", *names, "--api-key", CLOUD_KEY, *SLOW
    ) as url:
        yield url


def _cloud_settings(cloud: str, profiles: dict[str, Any], default: str, **extra: Any) -> Any:
    return gateway_settings(
        profiles,
        default,
        OPENAI_API_KEY=CLOUD_KEY,
        OPENAI_BASE_URL=f"{cloud}/v1",
        CLOUD_MODEL="cloud-model",
        MAX_QUEUE_SIZE=1,
        **extra,
    )


async def _cloud_requests(cloud: str) -> int:
    # The stand-in cloud has an API key: its test routes want it as well.
    async with httpx.AsyncClient(headers={"Authorization": f"Bearer {CLOUD_KEY}"}) as client:
        stats = (await client.get(f"{cloud}/simulator/stats")).json()
    return int(stats["requests_total"])


async def _open_stream(
    gw: Gateway, opened: asyncio.Event, go: asyncio.Event
) -> tuple[str, set[str], int]:
    """One streamed chat: (route header, models in the chunks, content deltas)."""
    async with gw.http.stream(
        "POST", "/v1/chat/completions", json={**SLOW_BODY, "stream": True}
    ) as response:
        assert response.status_code == 200, await response.aread()
        opened.set()
        await go.wait()
        models: set[str] = set()
        deltas = 0
        async for line in response.aiter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[len("data: ") :])
            models.add(chunk["model"])
            deltas += bool(chunk["choices"] and chunk["choices"][0]["delta"].get("content"))
        return response.headers["x-gateway-route"], models, deltas


async def test_saturated_local_overflows_to_the_cloud(cloud: str) -> None:
    settings = _cloud_settings(cloud, {"sim": sim_profile("sim", *SLOW)}, "sim")
    cloud_before = await _cloud_requests(cloud)
    async with gateway(settings) as gw:
        go = asyncio.Event()
        opened = [asyncio.Event() for _ in range(3)]
        streams = [asyncio.create_task(_open_stream(gw, event, go)) for event in opened]
        await asyncio.wait_for(asyncio.gather(*(event.wait() for event in opened)), 10)
        during = await gw.lb()
        go.set()
        results = await asyncio.gather(*streams)
        after = await gw.lb()
    routes = sorted(route for route, _, _ in results)
    assert routes == ["cloud", "cloud", "local"]
    for route, models, deltas in results:
        assert models == ({"cloud-model"} if route == "cloud" else {"sim"})
        assert deltas == 20
    assert during["local_requests"] == 1
    assert during["cloud_requests"] == 2
    assert during["current_requests"] == 3
    assert after["overflow_count"] == 2
    assert after["cloud_model"] == "cloud-model"
    assert after["local_model"] == "sim"
    assert after["current_requests"] == 0
    # The cloud got exactly the overflow, with the gateway's key (it answers 401 without it).
    assert await _cloud_requests(cloud) == cloud_before + 2


@asynccontextmanager
async def _local_slot_held(gw: Gateway) -> AsyncIterator[None]:
    """A 20 s local stream holds the only local slot until the block ends (its client leaves)."""
    body = {**SLOW_BODY, "max_tokens": 400, "stream": True}
    async with gw.http.stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.headers["x-gateway-route"] == "local"
        yield


async def _lb_is(gw: Gateway, **expected: int) -> bool:
    lb = await gw.lb()
    return all(lb[name] == value for name, value in expected.items())


# No local request has finished yet in these gateways, so the mean service time is its seed,
# 1 s: with one slot, a request's predicted wait is (requests queued ahead of it + 1) * 1 s.


async def test_within_the_slo_a_full_local_queues_instead_of_overflowing(cloud: str) -> None:
    settings = _cloud_settings(cloud, {"sim": sim_profile("sim", *SLOW)}, "sim", OVERFLOW_SLO_S=30)
    cloud_before = await _cloud_requests(cloud)
    async with gateway(settings) as gw:
        async with _local_slot_held(gw):
            # Predicted 1 s, within the SLO: it waits for the local slot.
            queued = asyncio.create_task(gw.http.post("/v1/chat/completions", json=SHORT_BODY))
            await eventually(lambda: _lb_is(gw, local_requests=1, queue_depth=1))
            during = await gw.lb()
        response = await queued
        after = await gw.lb()
    assert response.status_code == 200, response.text
    assert response.headers["x-gateway-route"] == "local"
    assert response.json()["model"] == "sim"
    assert during["cloud_requests"] == 0
    # The next arrival would have one request ahead of it.
    assert during["predicted_wait_s"] == 2.0
    assert after["overflow_count"] == 0
    assert await _cloud_requests(cloud) == cloud_before


async def test_over_the_slo_a_full_local_overflows(cloud: str) -> None:
    settings = _cloud_settings(cloud, {"sim": sim_profile("sim", *SLOW)}, "sim", OVERFLOW_SLO_S=1.5)
    async with gateway(settings) as gw:
        async with _local_slot_held(gw):
            # Predicted 1 s, within the SLO: it waits for the local slot.
            queued_at = time.monotonic()
            queued = asyncio.create_task(gw.http.post("/v1/chat/completions", json=SHORT_BODY))
            await eventually(lambda: _lb_is(gw, local_requests=1, queue_depth=1))
            # Predicted 2 s with that one ahead of it, over the SLO: to the cloud at once.
            over = await gw.http.post("/v1/chat/completions", json=SHORT_BODY)
            during = await gw.lb()
            # The slot stays busy past the first one's prediction: once it has waited the SLO,
            # it overflows too.
            late = await queued
            late_after = time.monotonic() - queued_at
        after = await gw.lb()
    assert over.status_code == 200, over.text
    assert over.headers["x-gateway-route"] == "cloud"
    assert over.json()["model"] == "cloud-model"
    assert during["queue_depth"] == 1
    assert late.status_code == 200, late.text
    assert late.headers["x-gateway-route"] == "cloud"
    assert 1.5 <= late_after < 3.5
    assert after["overflow_count"] == 2


async def test_switching_or_idle_engine_overflows_to_the_cloud(cloud: str) -> None:
    profiles = {
        "sim": sim_profile("sim"),
        "slow-start": sim_profile("slow-start", "--startup-delay", "1.5"),
    }
    async with gateway(_cloud_settings(cloud, profiles, "sim")) as gw:
        local = await gw.http.post("/v1/chat/completions", json={"messages": HELLO})
        accepted = await gw.http.post(
            "/api/models/switch", json={"profile_id": "slow-start", "exclusive": True}, headers=AUTH
        )
        assert accepted.status_code == 202
        state = (await gw.lb())["engine_state"]
        during = await gw.http.post(
            "/v1/chat/completions", json={"messages": HELLO, "max_tokens": 2}
        )
        embeddings = await gw.http.post("/v1/embeddings", json={"input": "hello"})
        await gw.wait_ready("slow-start")
        back = await gw.http.post("/v1/chat/completions", json={"messages": HELLO})
        lb = await gw.lb()
    assert local.headers["x-gateway-route"] == "local"
    assert state != "ready"
    assert during.status_code == 200, during.text
    assert during.headers["x-gateway-route"] == "cloud"
    assert during.json()["model"] == "cloud-model"
    assert embeddings.status_code == 200, embeddings.text
    assert embeddings.headers["x-gateway-route"] == "cloud"
    assert back.headers["x-gateway-route"] == "local"
    assert back.json()["model"] == "slow-start"
    assert lb["overflow_count"] == 2


async def test_no_engine_at_all_overflows_to_the_cloud(cloud: str) -> None:
    settings = _cloud_settings(cloud, {"sim": sim_profile("sim")}, "sim", ENGINE="none")
    async with gateway(settings, wait=False) as gw:
        response = await gw.http.post(
            "/v1/chat/completions", json={"messages": HELLO, "max_tokens": 2}
        )
        lb = await gw.lb()
    assert response.status_code == 200, response.text
    assert response.headers["x-gateway-route"] == "cloud"
    assert response.json()["model"] == "cloud-model"
    assert lb["engine_state"] == "idle"
    assert lb["overflow_count"] == 1


async def test_cloud_model_names_and_the_model_map(cloud: str) -> None:
    profiles = {"sim": sim_profile("sim")}
    settings = _cloud_settings(
        cloud, profiles, "sim", ENGINE="none", CLOUD_MODEL_MAP={"sim": "cloud-big"}
    )
    async with gateway(settings, wait=False) as gw:

        async def ask(model: str) -> httpx.Response:
            body = {"model": model, "messages": HELLO, "max_tokens": 2}
            return await gw.http.post("/v1/chat/completions", json=body)

        current, mapped, named, unknown = [
            await ask(model) for model in ("current", "sim", "cloud-big", "cloud-small")
        ]
    assert current.json()["model"] == "cloud-model"
    # A local model's requests go to the cloud model it is mapped to...
    assert mapped.json()["model"] == "cloud-big"
    # ...and a mapped cloud model may be named directly: it is kept, not replaced by the default.
    assert named.status_code == 200, named.text
    assert named.headers["x-gateway-route"] == "cloud"
    assert named.json()["model"] == "cloud-big"
    assert unknown.status_code == 404
    assert unknown.json()["error"]["code"] == "model_not_found"


async def test_auto_switch_still_switches_when_a_cloud_is_configured(cloud: str) -> None:
    profiles = {"sim-a": sim_profile("sim-a"), "sim-b": sim_profile("sim-b")}
    async with gateway(_cloud_settings(cloud, profiles, "sim-a", AUTO_SWITCH=True)) as gw:
        body = {"model": "sim-b", "messages": HELLO, "max_tokens": 2}
        first = await gw.http.post("/v1/chat/completions", json=body)
        # The request started a load of sim-b (it may itself be served by the cloud meanwhile).
        engine = gw.manager.engine("sim-b")
        assert engine is not None
        assert engine.serves or gw.manager.job_for("sim-b") is not None
        await gw.wait_ready("sim-b", timeout_s=10)
        later = await gw.http.post("/v1/chat/completions", json=body)
    assert first.status_code == 200
    assert later.headers["x-gateway-route"] == "local"
    assert later.json()["model"] == "sim-b"


async def test_dead_engine_overflows_to_the_cloud(cloud: str) -> None:
    # Restarts off: the engine stays dead (while a restart waits, requests overflow the same way).
    settings = _cloud_settings(cloud, {"sim": sim_profile("sim")}, "sim", ENGINE_RESTART_MAX=0)
    async with gateway(settings) as gw:
        os.killpg(int(gw.manager.handle.id), signal.SIGKILL)
        # The manager's watchdog notices the dead engine (checked every second).
        for _ in range(60):
            if gw.manager.state.value == "failed":
                break
            await asyncio.sleep(0.05)
        assert gw.manager.state.value == "failed"
        assert "exited while serving" in (gw.manager.status().error or "")
        response = await gw.http.post(
            "/v1/chat/completions", json={"messages": HELLO, "max_tokens": 2}
        )
    assert response.status_code == 200, response.text
    assert response.headers["x-gateway-route"] == "cloud"


async def test_without_a_cloud_extra_requests_queue_and_are_all_served() -> None:
    settings = gateway_settings(
        {"sim": sim_profile("sim", *SLOW)}, "sim", MAX_QUEUE_SIZE=1, QUEUE_TIMEOUT_S=30
    )
    body = {"messages": HELLO, "max_tokens": 8, "ignore_eos": True}
    async with gateway(settings) as gw:
        engine = await gw.wait_ready()
        peak = {"running": 0, "queue_depth": 0}
        done = asyncio.Event()

        async def watch() -> None:
            while not done.is_set():
                stats, lb = await asyncio.gather(gw.sim_stats(engine), gw.lb())
                peak["running"] = max(peak["running"], stats["running"])
                peak["queue_depth"] = max(peak["queue_depth"], lb["queue_depth"])
                await asyncio.sleep(0.02)

        watcher = asyncio.create_task(watch())
        started = time.monotonic()
        responses = await asyncio.gather(
            *(gw.http.post("/v1/chat/completions", json=body) for _ in range(3))
        )
        elapsed = time.monotonic() - started
        done.set()
        await watcher
        stats = await gw.sim_stats(engine)
        lb = await eventually(gw.lb)
    assert [r.status_code for r in responses] == [200, 200, 200]
    assert {r.headers["x-gateway-route"] for r in responses} == {"local"}
    assert all(r.json()["usage"]["completion_tokens"] == 8 for r in responses)
    # One at a time on the engine, the others waiting in the gateway's queue.
    assert peak["running"] == 1
    assert peak["queue_depth"] == 2
    assert elapsed > 3 * 7 / 20
    assert stats["requests_total"] == 3
    assert lb["overflow_count"] == 0
    assert lb["cloud_model"] is None


@pytest.mark.parametrize("max_waiting", [0, 1])
async def test_without_a_cloud_the_waiting_queue_is_bounded(max_waiting: int) -> None:
    settings = gateway_settings(
        {"sim": sim_profile("sim", *SLOW)},
        "sim",
        MAX_QUEUE_SIZE=1,
        QUEUE_MAX_WAITING=max_waiting,
        QUEUE_TIMEOUT_S=30,
    )
    async with gateway(settings) as gw:

        def post() -> asyncio.Task[httpx.Response]:
            return asyncio.create_task(gw.http.post("/v1/chat/completions", json=SLOW_BODY))

        async def lb_shows(local: int, waiting: int) -> bool:
            lb = await gw.lb()
            return bool(lb["local_requests"] == local and lb["queue_depth"] == waiting)

        # One takes the only slot, max_waiting wait for it, the next is refused at once.
        served = [post()]
        await eventually(lambda: lb_shows(1, 0))
        served += [post() for _ in range(max_waiting)]
        await eventually(lambda: lb_shows(1, max_waiting))
        started = time.monotonic()
        refused = await post()
        refused_after = time.monotonic() - started
        responses = await asyncio.gather(*served)
    assert [r.status_code for r in responses] == [200] * (max_waiting + 1)
    assert refused.status_code == 503, refused.text
    assert refused_after < 0.5
    assert refused.json()["error"]["code"] == "queue_full"
    assert refused.headers["retry-after"]
    assert refused.headers["x-error-source"] == "gateway"


@pytest.mark.parametrize("cloud_routes", [None, ["chat", "responses", "messages"]])
async def test_only_routes_the_cloud_speaks_overflow(
    cloud: str, cloud_routes: list[str] | None
) -> None:
    # By default the cloud is OpenAI's API: the Responses API overflows, Anthropic's messages
    # and rerank wait for the local engine; CLOUD_ROUTES adds messages for an upstream that
    # speaks Anthropic's API (the stand-in cloud, a simulator, does).
    profiles = {"sim": sim_profile("sim", "--startup-delay", "2")}
    extra = {} if cloud_routes is None else {"CLOUD_ROUTES": cloud_routes}
    settings = _cloud_settings(cloud, profiles, "sim", ENGINE="none", **extra)
    async with gateway(settings, wait=False) as gw:
        responses = await gw.http.post(
            "/v1/responses", json={"input": "hello", "max_output_tokens": 3}
        )
        messages = await gw.http.post(
            "/v1/messages",
            json={"max_tokens": 3, "messages": [{"role": "user", "content": "hi"}]},
            headers={"x-api-key": "unused"},
        )
        rerank = await gw.http.post("/v1/rerank", json={"query": "q", "documents": ["d"]})
    assert responses.status_code == 200, responses.text
    assert responses.headers["x-gateway-route"] == "cloud"
    assert responses.json()["model"] == "cloud-model"
    # Nothing local is serving: what may not overflow is refused with the gateway's 503.
    assert rerank.status_code == 503, rerank.text
    assert rerank.json()["error"]["code"] == "engine_unavailable"
    if cloud_routes is None:
        assert messages.status_code == 503, messages.text
        assert messages.json()["error"]["type"] == "overloaded_error"
    else:
        assert messages.status_code == 200, messages.text
        assert messages.headers["x-gateway-route"] == "cloud"
        assert messages.json()["type"] == "message"
