"""Faults with real engines: client disconnects, engine errors, deaths, stalls, unreachable."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import AsyncIterator
from typing import Any

import openai
import orjson
import pytest
from openai.types.chat import ChatCompletionMessageParam
from sqlalchemy import select

from gateway.db import create_engine, create_session_factory
from gateway.proxy.service import route_timeout
from gateway.proxy.validation import Route
from gateway.usage.models import UsageRecord
from tests.helpers.app import make_settings
from tests.helpers.polling import eventually
from tests.helpers.proxy import HELLO, Gateway, gateway, gateway_settings, sim_profile

IGNORE_EOS = {"ignore_eos": True}


def _content(chunk: Any) -> str:
    return (chunk.choices[0].delta.content or "") if chunk.choices else ""


async def _collect(stream: Any, deltas: list[str]) -> None:
    """Read a stream to its end (or its error), keeping the content deltas."""
    async for chunk in stream:
        if _content(chunk):
            deltas.append(_content(chunk))


def _one_profile(*flags: str, **settings: Any) -> Any:
    return gateway_settings({"sim": sim_profile("sim", *flags)}, "sim", **settings)


@pytest.fixture(scope="module")
async def slow() -> AsyncIterator[Gateway]:
    """An engine that decodes 20 tokens per second per stream."""
    async with gateway(_one_profile("--tokens-per-second", "20")) as served:
        yield served


async def _aborted_and_released(gw: Gateway, engine_url: str, aborted: int) -> dict[str, Any]:
    """Within 2 s: the engine counted the abort, runs nothing, and the gateway holds no slot."""

    async def settled() -> dict[str, Any] | None:
        stats = await gw.sim_stats(engine_url)
        lb = await gw.lb()
        engine_done = stats["aborted_total"] == aborted and stats["running"] == 0
        if engine_done and lb["local_requests"] == 0 and lb["current_requests"] == 0:
            return stats
        return None

    result: dict[str, Any] = await eventually(settled, timeout_s=2.0, interval_s=0.02)
    return result


async def test_client_disconnect_mid_stream_aborts_the_engine_request(slow: Gateway) -> None:
    engine_url = await slow.wait_ready()
    before = await slow.sim_stats(engine_url)
    async with slow.sdk() as sdk:
        stream = await sdk.chat.completions.create(
            model="sim", messages=HELLO, max_tokens=200, stream=True, extra_body=IGNORE_EOS
        )
        deltas = []
        async for chunk in stream:
            if _content(chunk):
                deltas.append(_content(chunk))
            if len(deltas) == 3:
                break
        during_lb = await slow.lb()
        during = await slow.sim_stats(engine_url)
        await stream.close()
        closed = time.monotonic()
        after = await _aborted_and_released(slow, engine_url, before["aborted_total"] + 1)
    assert time.monotonic() - closed < 2.0
    assert during_lb["local_requests"] == 1
    assert during["running"] == 1
    # 200 tokens at 20/s would take 10 s: the engine stopped early, it did not finish.
    assert after["completed_total"] == before["completed_total"]
    assert after["generation_tokens_total"] - before["generation_tokens_total"] < 50


async def test_client_disconnect_before_a_whole_reply_aborts_the_engine_request(
    slow: Gateway,
) -> None:
    engine_url = await slow.wait_ready()
    before = await slow.sim_stats(engine_url)
    async with slow.sdk(timeout=0.5) as sdk:
        started = time.monotonic()
        with pytest.raises(openai.APITimeoutError):
            await sdk.chat.completions.create(
                model="sim", messages=HELLO, max_tokens=100, extra_body=IGNORE_EOS
            )
    gone = time.monotonic()
    after = await _aborted_and_released(slow, engine_url, before["aborted_total"] + 1)
    assert gone - started < 2.0
    assert after["requests_total"] == before["requests_total"] + 1
    assert after["completed_total"] == before["completed_total"]


async def test_engine_error_after_200_reaches_the_client_as_an_error_event() -> None:
    async with gateway(_one_profile("--error-after-chunks", "3")) as gw:
        async with gw.sdk() as sdk:
            stream = await sdk.chat.completions.create(
                model="sim", messages=HELLO, max_tokens=20, stream=True, extra_body=IGNORE_EOS
            )
            deltas: list[str] = []
            with pytest.raises(openai.APIError) as raised:
                await _collect(stream, deltas)
        lb = await gw.lb()
        # The raw stream: deltas, the engine's error event as it sent it, then [DONE].
        async with gw.http.stream(
            "POST",
            "/v1/chat/completions",
            json={"messages": HELLO, "max_tokens": 20, "stream": True},
        ) as response:
            lines = [line async for line in response.aiter_lines() if line.startswith("data:")]
    assert len(deltas) == 3
    assert "Simulated engine error" in raised.value.message
    assert not isinstance(raised.value, openai.APIStatusError)  # it came after the 200
    assert lb["local_requests"] == 0
    assert response.status_code == 200
    assert lines[-2].startswith('data: {"error"')
    assert lines[-1] == "data: [DONE]"


async def test_engine_dying_mid_stream_ends_with_upstream_disconnected() -> None:
    # Restarts off: the next request meets the dead engine (with restarts it would wait for
    # the restarted one: tests/gateway/test_engine_recovery.py).
    async with gateway(_one_profile("--die-after-chunks", "3", ENGINE_RESTART_MAX=0)) as gw:
        pid = int(gw.manager.handle.id)
        async with gw.sdk() as sdk:
            stream = await sdk.chat.completions.create(
                model="sim", messages=HELLO, max_tokens=20, stream=True, extra_body=IGNORE_EOS
            )
            deltas: list[str] = []
            with pytest.raises(openai.APIError) as raised:
                await _collect(stream, deltas)
            lb = await gw.lb()
            # The engine is gone: the next request is refused by the gateway, not hung.
            with pytest.raises(openai.InternalServerError) as next_request:
                await sdk.chat.completions.create(model="sim", messages=HELLO, max_tokens=2)
    # The engine really died (the gateway reaped it on shutdown).
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert len(deltas) == 3
    assert raised.value.code == "upstream_disconnected"
    assert raised.value.type == "service_unavailable_error"
    assert lb["local_requests"] == 0
    assert next_request.value.status_code == 503
    assert next_request.value.code == "engine_unavailable"


async def _usage_rows(settings: Any) -> list[tuple[int, int, int]]:
    """(status, prompt tokens, completion tokens) of the usage rows, oldest first."""
    engine = create_engine(settings.DATABASE_URL)
    try:
        async with create_session_factory(engine)() as session:
            rows = await session.scalars(select(UsageRecord).order_by(UsageRecord.id))
            return [(r.status_code, r.prompt_tokens, r.completion_tokens) for r in rows]
    finally:
        await engine.dispose()


async def test_a_stream_the_engine_cut_off_still_counts_its_tokens() -> None:
    # The engine dies after 5 tokens, before its usage chunk: the gateway counts the 5 it
    # relayed, in the usage row and against the token budget (4 per minute: now spent).
    settings = _one_profile("--die-after-chunks", "5", RATE_LIMIT_STANDARD_TOKENS_PER_MINUTE=4)
    async with gateway(settings) as gw:
        async with gw.sdk() as sdk:
            stream = await sdk.chat.completions.create(
                model="sim", messages=HELLO, max_tokens=20, stream=True, extra_body=IGNORE_EOS
            )
            deltas: list[str] = []
            with pytest.raises(openai.APIError):
                await _collect(stream, deltas)
        over_budget = await gw.http.post("/v1/chat/completions", json={"messages": HELLO})
    # The gateway has written its usage out on shutdown.
    rows = await _usage_rows(settings)
    assert len(deltas) == 5
    assert rows == [(200, 0, 5)]
    assert over_budget.status_code == 429, over_budget.text
    assert over_budget.json()["error"]["code"] == "token_rate_limit_exceeded"


async def test_a_stream_the_client_left_still_counts_its_tokens() -> None:
    settings = _one_profile("--tokens-per-second", "20")
    async with gateway(settings) as gw:
        async with gw.sdk() as sdk:
            stream = await sdk.chat.completions.create(
                model="sim", messages=HELLO, max_tokens=200, stream=True, extra_body=IGNORE_EOS
            )
            deltas = 0
            async for chunk in stream:
                deltas += bool(_content(chunk))
                if deltas == 4:
                    break
            await stream.close()
        await eventually(lambda: _lb_is(gw, local_requests=0))
    [(status, prompt, completion)] = await _usage_rows(settings)
    assert (status, prompt) == (200, 0)
    # About the 4 tokens the client read: the gateway may have had one or two more in flight.
    assert 4 <= completion <= 6


async def test_engine_stall_ends_the_stream_with_upstream_stalled() -> None:
    settings = _one_profile("--stall-after-chunks", "2", STREAM_IDLE_TIMEOUT_S=1)
    async with gateway(settings) as gw:
        engine_url = await gw.wait_ready()
        async with gw.sdk() as sdk:
            started = time.monotonic()
            stream = await sdk.chat.completions.create(
                model="sim", messages=HELLO, max_tokens=20, stream=True, extra_body=IGNORE_EOS
            )
            deltas: list[str] = []
            with pytest.raises(openai.APIError) as raised:
                await _collect(stream, deltas)
            elapsed = time.monotonic() - started
        # The gateway hung up on the stalled engine, which counts the request as aborted.
        stats = await _aborted_and_released(gw, engine_url, 1)
    assert len(deltas) == 2
    assert raised.value.code == "upstream_stalled"
    assert raised.value.type == "timeout_error"
    assert 0.9 < elapsed < 3.0
    assert stats["completed_total"] == 0


async def test_unreachable_engine_is_503_from_the_gateway() -> None:
    # Restarts off, so that the engine stays dead (tests/gateway/test_engine_recovery.py has
    # the restart, and what users see of a crash in detail).
    async with gateway(_one_profile(ENGINE_RESTART_MAX=0)) as gw:
        async with gw.sdk() as sdk:
            ok = await sdk.chat.completions.create(model="sim", messages=HELLO, max_tokens=2)
            os.killpg(int(gw.manager.handle.id), signal.SIGKILL)
            await asyncio.sleep(0.2)
            with pytest.raises(openai.InternalServerError) as whole:
                await sdk.chat.completions.create(model="sim", messages=HELLO, max_tokens=2)
            with pytest.raises(openai.InternalServerError) as streamed:
                await sdk.chat.completions.create(
                    model="sim", messages=HELLO, max_tokens=2, stream=True
                )
        lb = await gw.lb()
        state_after = gw.manager.state.value
    assert ok.model == "sim"
    for raised in (whole.value, streamed.value):
        assert raised.status_code == 503
        assert raised.code == "engine_unavailable"
        assert raised.response.headers["x-error-source"] == "gateway"
        assert raised.response.headers["retry-after"]
    # The first request either found the engine gone (which made the manager check and mark it
    # failed) or, if the once-a-second watchdog got there first, was refused as the next one is:
    # before any engine call, saying why (a stable sentence: the engine's own last log line is
    # for admins). Both are right; which one wins is timing.
    stopped = "No engine is serving: the engine stopped unexpectedly."
    first_found_it_gone = whole.value.response.headers.get("x-gateway-route") == "local"
    assert first_found_it_gone or stopped in whole.value.message
    assert stopped in streamed.value.message
    assert state_after == "failed"
    assert lb["local_requests"] == 0


async def test_engine_errors_pass_through_with_their_status_and_body() -> None:
    too_long: list[ChatCompletionMessageParam] = [{"role": "user", "content": "word " * 200}]
    async with gateway(_one_profile("--max-model-len", "64")) as gw:
        engine_url = await gw.wait_ready()
        body = {"model": "sim", "messages": too_long, "max_tokens": 4}
        direct = await gw.http.post(
            f"{engine_url}/v1/chat/completions", json=body, headers=gw.engine_headers()
        )
        relayed = await gw.http.post("/v1/chat/completions", json=body)
        relayed_stream = await gw.http.post("/v1/chat/completions", json={**body, "stream": True})
        async with gw.sdk() as sdk:
            with pytest.raises(openai.BadRequestError) as raised:
                await sdk.chat.completions.create(model="sim", messages=too_long, max_tokens=4)
    assert direct.status_code == 400
    assert relayed.status_code == direct.status_code
    assert relayed.json() == direct.json()
    assert relayed.headers["x-error-source"] == "upstream"
    assert relayed.headers["x-gateway-route"] == "local"
    assert relayed_stream.status_code == 400
    assert relayed_stream.headers["x-error-source"] == "upstream"
    assert "maximum context length" in relayed_stream.json()["message"]
    assert raised.value.response.headers["x-error-source"] == "upstream"
    assert "maximum context length" in raised.value.message


async def test_client_leaving_while_queued_gives_up_its_place() -> None:
    settings = _one_profile("--tokens-per-second", "20", MAX_QUEUE_SIZE=1)
    body = {"messages": HELLO, "max_tokens": 20, "ignore_eos": True}
    async with gateway(settings) as gw:
        engine_url = await gw.wait_ready()
        running = asyncio.create_task(gw.http.post("/v1/chat/completions", json=body))
        await eventually(lambda: _lb_is(gw, local_requests=1))
        async with gw.sdk(timeout=0.3) as sdk:
            with pytest.raises(openai.APITimeoutError):
                await sdk.chat.completions.create(model="sim", messages=HELLO, max_tokens=2)
        try:
            await eventually(lambda: _lb_is(gw, local_requests=1, queue_depth=0), 0.5)
        finally:
            assert (await running).status_code == 200
        stats = await gw.sim_stats(engine_url)
    assert stats["requests_total"] == 1


async def _lb_is(gw: Gateway, **expected: int) -> bool:
    lb = await gw.lb()
    return all(lb[name] == value for name, value in expected.items())


# -- per-route upstream timeouts -----------------------------------------------------------------


def _events(lines: list[str]) -> list[Any]:
    """The data of an SSE stream's events, read line by line ([DONE] as is)."""
    data = [line[6:] for line in lines if line.startswith("data: ")]
    return [value if value == "[DONE]" else orjson.loads(value) for value in data]


async def test_route_timeouts_apply_per_route_and_bound_the_first_event() -> None:
    # Prefill takes 2 s: over the chat timeout, within the completions one.
    settings = _one_profile(
        "--first-token-delay", "2", CHAT_TIMEOUT_S=0.5, COMPLETIONS_TIMEOUT_S=30
    )
    chat = {"model": "sim", "messages": HELLO, "max_tokens": 3}
    async with gateway(settings) as gw:
        engine_url = await gw.wait_ready()
        started = time.monotonic()
        whole = await gw.http.post("/v1/chat/completions", json=chat)
        whole_s = time.monotonic() - started
        # A stream's headers come at once (as from vLLM, before prefill): the route timeout
        # bounds the wait for its first event, which ends it with an error event.
        started = time.monotonic()
        async with gw.http.stream(
            "POST", "/v1/chat/completions", json={**chat, "stream": True}
        ) as streamed:
            lines = [line async for line in streamed.aiter_lines()]
        stream_s = time.monotonic() - started
        completion = await gw.http.post(
            "/v1/completions", json={"model": "sim", "prompt": "hello", "max_tokens": 3}
        )
        # The gateway hung up on both timed-out requests; the engine counts them as aborted.
        stats = await _aborted_and_released(gw, engine_url, 2)
    assert whole.status_code == 504, whole.text
    assert whole.headers["x-error-source"] == "gateway"
    assert whole.json()["error"]["code"] == "upstream_timeout"
    assert whole.json()["error"]["type"] == "timeout_error"
    assert 0.4 < whole_s < 1.5
    assert streamed.status_code == 200
    events = _events(lines)
    assert [event["error"]["code"] for event in events] == ["upstream_timeout"]
    assert events[0]["error"]["type"] == "timeout_error"
    assert 0.4 < stream_s < 1.5
    assert completion.status_code == 200, completion.text
    assert completion.json()["usage"]["completion_tokens"] >= 1
    assert stats["completed_total"] == 1


def test_each_route_has_its_own_timeout() -> None:
    settings = make_settings(CHAT_TIMEOUT_S=1, COMPLETIONS_TIMEOUT_S=2, EMBEDDINGS_TIMEOUT_S=3)
    timeouts = {route: route_timeout(settings, route) for route in Route}
    assert timeouts == {
        Route.CHAT: 1,
        Route.COMPLETIONS: 2,
        Route.EMBEDDINGS: 3,
        # Generating routes wait as long as chat; the others as embeddings.
        Route.RESPONSES: 1,
        Route.MESSAGES: 1,
        Route.TRANSCRIPTIONS: 1,
        Route.COUNT_TOKENS: 3,
        Route.RERANK: 3,
        Route.SCORE: 3,
        Route.TOKENIZE: 3,
        Route.DETOKENIZE: 3,
    }
