"""Switches are invisible to clients: requests wait for the engine instead of failing."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

import openai
import orjson
import pytest

from gateway.proxy.service import LOADING_NOTICE_S
from tests.helpers.polling import eventually
from tests.helpers.proxy import (
    AUTH,
    HELLO,
    Gateway,
    gateway,
    gateway_settings,
    sim_profile,
)

IGNORE_EOS = {"ignore_eos": True}
TOKENS = 10
# 200 tokens/s: a request of 10 tokens takes ~50 ms, so some are always in flight.
PACE = ("--tokens-per-second", "200")


@dataclass
class Served:
    """One client loop's record: (start, end, model) per request, and any failure."""

    results: list[tuple[float, float, str]] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)


async def _client_loop(
    sdk: openai.AsyncOpenAI, stream: bool, until: asyncio.Event, served: Served
) -> Served:
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


@pytest.mark.parametrize("exclusive", [True, False], ids=["exclusive", "beside"])
async def test_switch_under_steady_load_fails_no_request(exclusive: bool) -> None:
    """Four clients send "current" requests in a loop through a switch from sim-a to sim-b.

    Exclusive (one engine at a time): sim-a is drained (requests in flight complete on it) and
    stopped, and requests sent meanwhile wait for sim-b. Beside (the fleet's switch): sim-b
    loads next to sim-a, which serves every request until sim-b is ready and stays resident.
    Either way no request fails, and "current" is sim-a before and sim-b after."""
    profiles = {"sim-a": sim_profile("sim-a", *PACE), "sim-b": sim_profile("sim-b", *PACE)}
    async with gateway(gateway_settings(profiles, "sim-a")) as gw, gw.sdk(timeout=30) as sdk:
        stop = asyncio.Event()
        records = [Served() for _ in range(4)]
        loops = [
            asyncio.create_task(_client_loop(sdk, stream, stop, record))
            for stream, record in zip((False, True, False, True), records, strict=True)
        ]

        def each_loop_has(count: int, since: float = 0.0) -> Any:
            # Wait on progress, not on the clock: a loaded machine serves fewer per second.
            async def check() -> bool:
                return all(
                    sum(start > since for start, _, _ in r.results) >= count for r in records
                )

            return check

        await eventually(each_loop_has(3), timeout_s=30)
        switch_started = time.monotonic()
        job = await gw.switch("sim-b", exclusive=exclusive)
        switch_done = time.monotonic()
        await eventually(each_loop_has(3, since=switch_done), timeout_s=30)
        stop.set()
        served = await asyncio.gather(*loops)
        lb = await gw.lb()
        sim_a = gw.manager.engine("sim-a")
        sim_a_state = sim_a.state.value if sim_a is not None else None
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
    # Requests in flight when the switch began completed on sim-a after it was asked for.
    drained = [end for _, end, model in results if model == "sim-a" and end > switch_started]
    assert drained
    if exclusive:
        # sim-a was stopped, so requests sent during the switch waited for sim-b.
        waited = [start for start, _, model in results if model == "sim-b" and start < switch_done]
        assert waited
        assert sim_a_state == "idle"
    else:
        # sim-a served requests sent while sim-b loaded (nobody waited for the load), and stays.
        during = [start for start, _, m in results if m == "sim-a" and start > switch_started]
        assert during
        assert sim_a_state == "ready"
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
    # One engine at a time: every load evicts the other (where no-thrash matters).
    settings = gateway_settings(profiles, "sim-a", AUTO_SWITCH=True, FLEET_MAX_ENGINES=1)
    async with gateway(settings) as gw:
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
    # The same for requests that name the loaded model by an alias, even queued after one for
    # another model: with one local slot busy, a request for sim-b queues, then three for
    # sim-a's alias; they go first, then one switch serves sim-b.
    profiles = {
        "sim-a": sim_profile("sim-a", *PACE, aliases=("alias-a",)),
        "sim-b": sim_profile("sim-b", *PACE),
    }
    settings = gateway_settings(
        profiles, "sim-a", AUTO_SWITCH=True, MAX_QUEUE_SIZE=1, FLEET_MAX_ENGINES=1
    )
    async with gateway(settings) as one_slot, one_slot.sdk(timeout=30) as sdk:
        jobs_before = len(_jobs(one_slot))
        running = asyncio.create_task(_ask(sdk, "sim-a", 100))
        await eventually(lambda: _in_flight(one_slot, 1))
        other = asyncio.create_task(_ask(sdk, "sim-b", 3))
        await eventually(lambda: _queued(one_slot, 1))
        aliased = [asyncio.create_task(_ask(sdk, "alias-a", 3)) for _ in range(3)]
        await eventually(lambda: _queued(one_slot, 4))
        served_aliased = await asyncio.gather(running, *aliased, other)
        jobs_aliased = [job.profile_id for job in _jobs(one_slot)[jobs_before:]]
    assert served == ["sim-a"] * 3 + ["sim-b"] * 3
    assert [job.profile_id for job in jobs] == ["sim-b"]
    assert served_aliased == ["sim-a", "alias-a", "alias-a", "alias-a", "sim-b"]
    assert jobs_aliased == ["sim-b"]
    assert (await auto.engine_status())["profile_id"] == "sim-b"


async def _ask(sdk: openai.AsyncOpenAI, model: str, tokens: int) -> str:
    completion = await sdk.chat.completions.create(
        model=model, messages=HELLO, max_tokens=tokens, extra_body=IGNORE_EOS
    )
    return completion.model


async def _in_flight(gw: Gateway, count: int) -> bool:
    return bool((await gw.lb())["local_requests"] == count)


async def _queued(gw: Gateway, count: int) -> bool:
    return bool((await gw.lb())["queue_depth"] == count)


async def test_auto_switch_does_not_act_on_unknown_models(auto: Gateway) -> None:
    response = await auto.http.post(
        "/v1/chat/completions", json={"model": "nope", "messages": HELLO}
    )
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "model_not_found"
    assert (await eventually(auto.engine_status))["profile_id"] == "sim-a"


# -- loading comments ----------------------------------------------------------------------------


async def _read_stream(gw: Gateway, body: dict[str, Any]) -> tuple[int, list[str]]:
    """A streamed chat request, raw: its status and every line it sent."""
    async with gw.http.stream("POST", "/v1/chat/completions", json=body) as response:
        return response.status_code, [line async for line in response.aiter_lines()]


async def _switch_started(gw: Gateway, profile_id: str) -> None:
    accepted = await gw.http.post(
        "/api/models/switch", json={"profile_id": profile_id}, headers=AUTH
    )
    assert accepted.status_code == 202, accepted.text


async def test_stream_waiting_for_a_loading_model_gets_loading_comments() -> None:
    # The switch takes over LOADING_NOTICE_S (process start + 3 s): a streamed request for the
    # model hears it is loading, then gets the normal stream; other clients see no difference.
    profiles = {
        "sim-a": sim_profile("sim-a", *PACE),
        "slow": sim_profile("slow", "--startup-delay", "3", *PACE),
    }
    body = {"model": "slow", "messages": HELLO, "max_tokens": 3, "stream": True}
    async with gateway(gateway_settings(profiles, "sim-a")) as gw, gw.sdk(timeout=30) as sdk:
        await _switch_started(gw, "slow")
        started = time.monotonic()
        raw, whole, sdk_stream = await asyncio.gather(
            _read_stream(gw, body),
            gw.http.post("/v1/chat/completions", json={**body, "stream": False}),
            sdk.chat.completions.create(
                model="slow", messages=HELLO, max_tokens=3, stream=True, extra_body=IGNORE_EOS
            ),
        )
        deltas = [chunk.choices[0].delta.content async for chunk in sdk_stream if chunk.choices]
        waited = time.monotonic() - started
    status, lines = raw
    assert status == 200
    first_data = next(i for i, line in enumerate(lines) if line.startswith("data: "))
    comments = [line for line in lines[:first_data] if line]
    assert comments
    assert set(comments) == {": model slow is loading"}
    assert not [line for line in lines[first_data:] if line.startswith(":")]
    assert lines[first_data:][-2:] == ["data: [DONE]", ""]
    chunks = [orjson.loads(line[6:]) for line in lines[first_data:-2] if line.startswith("data:")]
    assert {chunk["model"] for chunk in chunks} == {"slow"}
    assert whole.status_code == 200, whole.text
    assert whole.headers["content-type"].startswith("application/json")
    assert whole.json()["model"] == "slow"
    assert "".join(d or "" for d in deltas)
    assert waited > LOADING_NOTICE_S


async def test_stream_that_times_out_after_loading_comments_ends_with_an_error_event() -> None:
    # The queue timeout comes after the stream started: too late for a 503, so an error event.
    profiles = {
        "sim-a": sim_profile("sim-a", *PACE),
        "slow": sim_profile("slow", "--startup-delay", "6", *PACE),
    }
    body = {"model": "slow", "messages": HELLO, "max_tokens": 3, "stream": True}
    settings = gateway_settings(profiles, "sim-a", QUEUE_TIMEOUT_S=LOADING_NOTICE_S + 1)
    async with gateway(settings) as gw:
        await _switch_started(gw, "slow")
        status, lines = await asyncio.wait_for(_read_stream(gw, body), 10)
    assert status == 200
    assert lines[0] == ": model slow is loading"
    events = [orjson.loads(line[6:]) for line in lines if line.startswith("data: ")]
    assert [event["error"]["code"] for event in events] == ["engine_busy"]
