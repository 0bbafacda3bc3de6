"""Switches are invisible to clients: requests wait for the engine instead of failing."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

import openai
import pytest

from .conftest import HELLO, Gateway, eventually, gateway, gateway_settings, sim_profile

IGNORE_EOS = {"ignore_eos": True}
TOKENS = 10
# 200 tokens/s: a request of 10 tokens takes ~50 ms, so some are always in flight.
PACE = ("--tokens-per-second", "200")


@dataclass
class Served:
    """One client loop's record: (start, end, model) per request, and any failure."""

    results: list[tuple[float, float, str]] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)


async def _client_loop(sdk: openai.AsyncOpenAI, stream: bool, until: asyncio.Event) -> Served:
    served = Served()
    while not until.is_set():
        started = time.monotonic()
        try:
            if stream:
                chunks = await sdk.chat.completions.create(
                    model="current",
                    messages=HELLO,
                    max_tokens=TOKENS,
                    stream=True,
                    extra_body=IGNORE_EOS,
                )
                models, deltas = set(), 0
                async for chunk in chunks:
                    models.add(chunk.model)
                    deltas += bool(chunk.choices and chunk.choices[0].delta.content)
                if deltas != TOKENS or len(models) != 1:
                    served.failures.append(f"stream: {deltas} deltas from {models}")
                    continue
                model = models.pop()
            else:
                completion = await sdk.chat.completions.create(
                    model="current", messages=HELLO, max_tokens=TOKENS, extra_body=IGNORE_EOS
                )
                if completion.usage is None or completion.usage.completion_tokens != TOKENS:
                    served.failures.append(f"whole: usage {completion.usage}")
                    continue
                model = completion.model
        except openai.OpenAIError as exc:
            served.failures.append(f"{type(exc).__name__}: {exc}")
            continue
        served.results.append((started, time.monotonic(), model))
    return served


async def test_switch_under_steady_load_fails_no_request() -> None:
    profiles = {"sim-a": sim_profile("sim-a", *PACE), "sim-b": sim_profile("sim-b", *PACE)}
    async with gateway(gateway_settings(profiles, "sim-a")) as gw, gw.sdk(timeout=30) as sdk:
        stop = asyncio.Event()
        loops = [
            asyncio.create_task(_client_loop(sdk, stream, stop))
            for stream in (False, True, False, True)
        ]
        await asyncio.sleep(1.0)
        switch_started = time.monotonic()
        job = await gw.switch("sim-b")
        switch_done = time.monotonic()
        await asyncio.sleep(max(0.5, 3.0 - (switch_done - switch_started) - 1.0))
        stop.set()
        served = await asyncio.gather(*loops)
        lb = await gw.lb()
    assert job["status"] == "succeeded", job
    assert job["previous_profile_id"] == "sim-a"
    assert [s.failures for s in served] == [[], [], [], []]
    # Client-side times bracket the server's: a request that ended before the switch was asked
    # for was served by sim-a, one that started after it finished by sim-b.
    for loop in served:
        before = [model for _, end, model in loop.results if end < switch_started]
        after = [model for start, _, model in loop.results if start > switch_done]
        assert len(before) >= 3
        assert set(before) == {"sim-a"}
        assert len(after) >= 3
        assert set(after) == {"sim-b"}
    results = [result for loop in served for result in loop.results]
    # Both sides of the switch were exercised: requests in flight when it began were drained
    # (completed on sim-a after it was asked for), and requests sent during it waited for sim-b.
    drained = [end for _, end, model in results if model == "sim-a" and end > switch_started]
    waited = [start for start, _, model in results if model == "sim-b" and start < switch_done]
    assert drained
    assert waited
    assert lb["local_requests"] == 0
    assert lb["local_model"] == "sim-b"


async def test_request_while_loading_waits_and_is_served() -> None:
    profiles = {"slow": sim_profile("slow", "--startup-delay", "1.5")}
    async with gateway(gateway_settings(profiles, "slow"), wait=False) as gw:
        state = (await gw.lb())["engine_state"]
        started = time.monotonic()
        response = await gw.http.post(
            "/v1/chat/completions", json={"messages": HELLO, "max_tokens": 3}
        )
        waited = time.monotonic() - started
    assert state in {"idle", "starting", "loading"}
    assert response.status_code == 200, response.text
    assert response.json()["model"] == "slow"
    assert waited > 0.5


async def test_request_while_loading_gets_503_after_queue_timeout() -> None:
    profiles = {"slow": sim_profile("slow", "--startup-delay", "1.5")}
    settings = gateway_settings(profiles, "slow", QUEUE_TIMEOUT_S=0.5)
    async with gateway(settings, wait=False) as gw:
        started = time.monotonic()
        response = await gw.http.post(
            "/v1/chat/completions", json={"messages": HELLO, "max_tokens": 3}
        )
        waited = time.monotonic() - started
        # Once loaded, the same request is served.
        await gw.wait_ready()
        later = await gw.http.post(
            "/v1/chat/completions", json={"messages": HELLO, "max_tokens": 3}
        )
    assert response.status_code == 503, response.text
    assert response.headers["retry-after"]
    assert response.headers["x-error-source"] == "gateway"
    assert response.json()["error"]["code"] == "engine_busy"
    assert "slow" in response.json()["error"]["message"]
    assert 0.4 < waited < 1.4
    assert later.status_code == 200


# -- AUTO_SWITCH ---------------------------------------------------------------------------------


def _jobs(gw: Gateway) -> list[Any]:
    """Every switch job the manager ran (it keeps the recent ones)."""
    return list(gw.manager._jobs.values())


@pytest.fixture
async def auto() -> Any:
    profiles = {"sim-a": sim_profile("sim-a", *PACE), "sim-b": sim_profile("sim-b", *PACE)}
    async with gateway(gateway_settings(profiles, "sim-a", AUTO_SWITCH=True)) as gw:
        yield gw


async def test_auto_switch_serves_a_request_for_another_model(auto: Gateway) -> None:
    async with auto.sdk(timeout=30) as sdk:
        before = await auto.engine_status()
        completion = await sdk.chat.completions.create(model="sim-b", messages=HELLO, max_tokens=3)
    after = await auto.engine_status()
    assert before["profile_id"] == "sim-a"
    assert completion.model == "sim-b"
    assert after["profile_id"] == "sim-b"
    assert after["state"] == "ready"


async def test_auto_switch_concurrent_requests_share_one_switch(auto: Gateway) -> None:
    jobs_before = len(_jobs(auto))
    async with auto.sdk(timeout=30) as sdk:
        completions = await asyncio.gather(
            *(
                sdk.chat.completions.create(model="sim-b", messages=HELLO, max_tokens=3)
                for _ in range(6)
            )
        )
    engine = await auto.wait_ready("sim-b")
    stats = await auto.sim_stats(engine)
    jobs = _jobs(auto)[jobs_before:]
    assert [c.model for c in completions] == ["sim-b"] * 6
    assert [(job.profile_id, job.status.value) for job in jobs] == [("sim-b", "succeeded")]
    assert stats["requests_total"] == 6


async def test_auto_switch_serves_the_loaded_model_first(auto: Gateway) -> None:
    # Requests for the loaded model are in flight when requests for another arrive: those
    # finish on the loaded engine, then one switch serves the rest (no thrash).
    jobs_before = len(_jobs(auto))
    async with auto.sdk(timeout=30) as sdk:

        async def ask(model: str) -> str:
            completion = await sdk.chat.completions.create(
                model=model, messages=HELLO, max_tokens=40, extra_body=IGNORE_EOS
            )
            return completion.model

        first = [asyncio.create_task(ask("sim-a")) for _ in range(3)]
        await eventually(lambda: _in_flight(auto, 3))
        second = [asyncio.create_task(ask("sim-b")) for _ in range(3)]
        served = await asyncio.gather(*first, *second)
    jobs = _jobs(auto)[jobs_before:]
    assert served == ["sim-a"] * 3 + ["sim-b"] * 3
    assert [job.profile_id for job in jobs] == ["sim-b"]
    assert (await auto.engine_status())["profile_id"] == "sim-b"


async def _in_flight(gw: Gateway, count: int) -> bool:
    return bool((await gw.lb())["local_requests"] == count)


async def test_auto_switch_does_not_act_on_unknown_models(auto: Gateway) -> None:
    response = await auto.http.post(
        "/v1/chat/completions", json={"model": "nope", "messages": HELLO}
    )
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "model_not_found"
    assert (await eventually(auto.engine_status))["profile_id"] == "sim-a"
