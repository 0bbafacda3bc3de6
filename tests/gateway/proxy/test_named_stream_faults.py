"""Faults on the streams with named events (the Responses API, Anthropic's messages, relayed and
translated): an engine dying or erring mid-stream ends the stream with the API's own error
event after what was delivered, a client leaving aborts the engine's request, and the slot is
released on every path."""

from __future__ import annotations

import asyncio
from typing import Any

import anthropic
import orjson
import pytest

from gateway.proxy.service import LOADING_NOTICE_S
from tests.helpers.polling import eventually
from tests.helpers.proxy import AUTH, Gateway, gateway, gateway_settings, sim_profile

IGNORE_EOS = {"ignore_eos": True}
# route, path, body, the event that carries text
ROUTES: dict[str, tuple[str, dict[str, Any], str]] = {
    "responses": (
        "/v1/responses",
        {"input": "hello", "max_output_tokens": 50, "stream": True, **IGNORE_EOS},
        "response.output_text.delta",
    ),
    "messages": (
        "/v1/messages",
        {
            "max_tokens": 50,
            "messages": [{"role": "user", "content": "hello"}],
            "stream": True,
            **IGNORE_EOS,
        },
        "content_block_delta",
    ),
}


def _settings(*flags: str, translate: bool = False, **overrides: Any) -> Any:
    apis: tuple[str, ...] = ("responses",) if translate else ("responses", "messages")
    profile = sim_profile("sim", *flags, apis=apis)
    return gateway_settings({"sim": profile}, "sim", ENGINE_RESTART_MAX=0, **overrides)


def _events(text: str) -> list[tuple[str, dict[str, Any]]]:
    found = []
    for block in text.split("\n\n"):
        lines = block.splitlines()
        name = next((line[7:] for line in lines if line.startswith("event: ")), "")
        data = next((line[6:] for line in lines if line.startswith("data: ")), None)
        if data is not None:
            found.append((name, orjson.loads(data)))
    return found


async def _stream(gw: Gateway, route: str) -> list[tuple[str, dict[str, Any]]]:
    path, body, _ = ROUTES[route]
    async with gw.http.stream("POST", path, json={"model": "sim", **body}) as response:
        assert response.status_code == 200
        return _events("".join([chunk async for chunk in response.aiter_text()]))


async def _released(gw: Gateway) -> None:
    async def idle() -> bool | None:
        lb = await gw.lb()
        return True if lb["local_requests"] == 0 and lb["current_requests"] == 0 else None

    await eventually(idle, timeout_s=5)


@pytest.mark.parametrize(
    ("route", "translate"), [("responses", False), ("messages", False), ("messages", True)]
)
async def test_engine_dying_mid_stream_ends_with_the_apis_error_event(
    route: str, translate: bool
) -> None:
    async with gateway(_settings("--die-after-chunks", "6", translate=translate)) as gw:
        events = await _stream(gw, route)
        await _released(gw)
    _, _, text_event = ROUTES[route]
    names = [name for name, _ in events]
    assert text_event in names  # what came before the death was delivered
    last_name, last = events[-1]
    assert last_name == "error"
    assert last["type"] == "error"
    if route == "messages":
        assert last["error"]["type"] == "overloaded_error"
        assert "lost mid-stream" in last["error"]["message"]
        assert "message_stop" not in names
    else:
        assert last["code"] == "upstream_disconnected"
        assert "response.completed" not in names


@pytest.mark.parametrize("route", ["responses", "messages"])
async def test_engine_error_after_the_200_is_the_apis_error_event(route: str) -> None:
    async with gateway(_settings("--error-after-chunks", "4")) as gw:
        events = await _stream(gw, route)
        await _released(gw)
    assert events[-1][0] == "error"


@pytest.mark.parametrize("route", ["responses", "messages"])
async def test_a_stall_ends_the_stream_with_a_timeout_event(route: str) -> None:
    settings = _settings("--stall-after-chunks", "4", STREAM_IDLE_TIMEOUT_S=1)
    async with gateway(settings) as gw:
        events = await _stream(gw, route)
        await _released(gw)
    name, last = events[-1]
    assert name == "error"
    if route == "messages":
        assert last["error"]["type"] == "timeout_error"
    else:
        assert last["code"] == "upstream_stalled"


async def test_client_leaving_a_messages_stream_aborts_the_engine_request() -> None:
    async with gateway(_settings("--tokens-per-second", "20")) as gw:
        engine_url = await gw.wait_ready()
        sdk = anthropic.AsyncAnthropic(base_url=gw.url, api_key="x", max_retries=0)
        async with (
            sdk,
            sdk.messages.stream(
                model="sim",
                max_tokens=200,
                messages=[{"role": "user", "content": "hello"}],
                extra_body=IGNORE_EOS,
            ) as stream,
        ):
            seen = 0
            async for event in stream:
                seen += event.type == "content_block_delta"
                if seen == 3:
                    break

        async def aborted() -> bool | None:
            stats = await gw.sim_stats(engine_url)
            return True if stats["aborted_total"] == 1 and stats["running"] == 0 else None

        await eventually(aborted, timeout_s=2.0, interval_s=0.02)
        await _released(gw)


# -- waiting for a model that is loading ---------------------------------------------------------


async def _switched(gw: Gateway, profile_id: str) -> None:
    accepted = await gw.http.post(
        "/api/models/switch", json={"profile_id": profile_id}, headers=AUTH
    )
    assert accepted.status_code == 202, accepted.text


async def _raw_lines(gw: Gateway, path: str, body: dict[str, Any]) -> list[str]:
    async with gw.http.stream("POST", path, json=body) as response:
        assert response.status_code == 200
        return [line async for line in response.aiter_lines()]


@pytest.mark.parametrize("route", ["responses", "messages"])
async def test_a_stream_for_a_loading_model_gets_comments_then_its_events(route: str) -> None:
    profiles = {
        "sim-a": sim_profile("sim-a"),
        "slow": sim_profile("slow", "--startup-delay", "3"),
    }
    path, body, text_event = ROUTES[route]
    async with gateway(gateway_settings(profiles, "sim-a")) as gw:
        await _switched(gw, "slow")
        lines = await _raw_lines(gw, path, {**body, "model": "slow"})
    first_event = next(i for i, line in enumerate(lines) if line.startswith("event: "))
    assert set(filter(None, lines[:first_event])) == {": model slow is loading"}
    names = [line[7:] for line in lines if line.startswith("event: ")]
    assert text_event in names
    assert names[-1] in ("response.completed", "response.incomplete", "message_stop")


@pytest.mark.parametrize("route", ["responses", "messages"])
async def test_a_wait_that_times_out_after_the_200_is_the_apis_error_event(route: str) -> None:
    profiles = {
        "sim-a": sim_profile("sim-a"),
        "slow": sim_profile("slow", "--startup-delay", "6"),
    }
    path, body, _ = ROUTES[route]
    settings = gateway_settings(profiles, "sim-a", QUEUE_TIMEOUT_S=LOADING_NOTICE_S + 1)
    async with gateway(settings) as gw:
        await _switched(gw, "slow")
        lines = await asyncio.wait_for(_raw_lines(gw, path, {**body, "model": "slow"}), 10)
    assert lines[0] == ": model slow is loading"
    events = _events("\n".join(lines))
    assert [name for name, _ in events] == ["error"]
    error = events[0][1]
    assert error["type"] == "error"
    if route == "messages":
        assert error["error"]["type"] == "overloaded_error"
    else:
        assert error["code"] == "engine_busy"
