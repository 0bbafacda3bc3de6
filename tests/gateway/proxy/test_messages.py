"""Anthropic's Messages API through the gateway, with the official `anthropic` SDK unchanged.

Two engines: `sim-a` serves Anthropic's routes itself (the simulator implements vLLM's), so
they are relayed as sent; `sim-t` is an engine without them (the simulator with
`--without-api messages`, its profile listing no `apis`), so the gateway translates to chat
completions. The SDK must not be able to tell the two apart.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import anthropic
import pytest

from tests.helpers.proxy import ADMIN_KEY, Gateway, gateway, gateway_settings, sim_profile

HELLO: list[anthropic.types.MessageParam] = [{"role": "user", "content": "hello there"}]
WEATHER_TOOL: anthropic.types.ToolParam = {
    "name": "get_weather",
    "description": "The weather in a city.",
    "input_schema": {
        "type": "object",
        "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
        "required": ["city"],
    },
}
NATIVE, TRANSLATED = "sim-a", "sim-t"


@pytest.fixture(scope="module")
async def gw() -> AsyncIterator[Gateway]:
    profiles = {
        NATIVE: sim_profile(NATIVE),
        TRANSLATED: sim_profile(TRANSLATED, "--without-api", "messages", apis=()),
    }
    settings = gateway_settings(profiles, NATIVE, REQUIRE_AUTH=True, FLEET_MAX_ENGINES=4)
    async with gateway(settings) as served:
        loaded = await served.http.post(
            f"/api/models/{TRANSLATED}/load", headers={"Authorization": f"Bearer {ADMIN_KEY}"}
        )
        assert loaded.status_code == 202, loaded.text
        await served.wait_ready(TRANSLATED)
        yield served


def client(gw: Gateway, **options: Any) -> anthropic.AsyncAnthropic:
    """The SDK as users configure it: the gateway's URL and a key (sent as x-api-key)."""
    options.setdefault("api_key", ADMIN_KEY)
    return anthropic.AsyncAnthropic(base_url=gw.url, max_retries=0, **options)


async def engine_paths(gw: Gateway, profile_id: str) -> list[str]:
    """The paths the engine of this profile was last asked for (the simulator's log)."""
    url = await gw.wait_ready(profile_id)
    engine = gw.manager.engine(profile_id)
    headers = {"Authorization": f"Bearer {engine.spec.api_key}"}
    response = await gw.http.get(f"{url}/simulator/requests", headers=headers)
    assert response.status_code == 200, response.text
    return [str(path) for path in response.json()["paths"]]


# -- relayed and translated: the same answers ---------------------------------------------------


@pytest.mark.parametrize("model", [NATIVE, TRANSLATED])
async def test_message(gw: Gateway, model: str) -> None:
    async with client(gw) as sdk:
        message = await sdk.messages.create(model=model, max_tokens=6, messages=HELLO)
    assert message.type == "message"
    assert message.role == "assistant"
    assert message.model == model
    assert message.content
    assert message.content[0].type == "text"
    assert message.content[0].text
    assert message.stop_reason in ("end_turn", "max_tokens")
    assert message.usage.input_tokens > 0
    assert 0 < message.usage.output_tokens <= 6
    wanted = "/v1/messages" if model == NATIVE else "/v1/chat/completions"
    assert (await engine_paths(gw, model))[-1] == wanted


@pytest.mark.parametrize("model", [NATIVE, TRANSLATED])
async def test_stream(gw: Gateway, model: str) -> None:
    sdk = client(gw)
    async with sdk, sdk.messages.stream(model=model, max_tokens=5, messages=HELLO) as stream:
        texts = [text async for text in stream.text_stream]
        final = await stream.get_final_message()
    assert texts
    assert final.content[0].type == "text"
    assert final.content[0].text == "".join(texts)
    assert final.stop_reason in ("end_turn", "max_tokens")
    assert 0 < final.usage.output_tokens <= 5


@pytest.mark.parametrize("model", [NATIVE, TRANSLATED])
async def test_stream_events_are_named_as_anthropic_names_them(gw: Gateway, model: str) -> None:
    body = {"model": model, "max_tokens": 4, "messages": HELLO, "stream": True}
    headers = {"x-api-key": ADMIN_KEY, "anthropic-version": "2023-06-01"}
    async with gw.http.stream("POST", "/v1/messages", json=body, headers=headers) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        text = "".join([chunk async for chunk in response.aiter_text()])
    names = [line[7:] for line in text.splitlines() if line.startswith("event: ")]
    assert names[0] == "message_start"
    assert names[-2:] == ["message_delta", "message_stop"]
    assert "content_block_delta" in names
    assert "[DONE]" not in text


@pytest.mark.parametrize("model", [NATIVE, TRANSLATED])
async def test_tool_call_round_trip(gw: Gateway, model: str) -> None:
    async with client(gw) as sdk:
        asked = await sdk.messages.create(
            model=model,
            max_tokens=32,
            messages=[{"role": "user", "content": "What is the weather in Oslo?"}],
            tools=[WEATHER_TOOL],
            tool_choice={"type": "tool", "name": "get_weather"},
        )
        assert asked.stop_reason == "tool_use"
        calls = [block for block in asked.content if block.type == "tool_use"]
        assert len(calls) == 1
        call = calls[0]
        assert call.name == "get_weather"
        assert isinstance(call.input, dict)
        assert isinstance(call.input.get("city"), str)
        answered = await sdk.messages.create(
            model=model,
            max_tokens=8,
            tools=[WEATHER_TOOL],
            messages=[
                {"role": "user", "content": "What is the weather in Oslo?"},
                {"role": "assistant", "content": asked.content},
                {
                    "role": "user",
                    "content": [
                        {"type": "tool_result", "tool_use_id": call.id, "content": "Sunny, 21 C"}
                    ],
                },
            ],
        )
    assert answered.stop_reason in ("end_turn", "max_tokens")
    assert answered.content[0].type == "text"
    assert answered.content[0].text


async def test_streamed_tool_call_arrives_as_json_deltas(gw: Gateway) -> None:
    for model in (NATIVE, TRANSLATED):
        async with (
            client(gw) as sdk,
            sdk.messages.stream(
                model=model,
                max_tokens=32,
                messages=[{"role": "user", "content": "Weather in Oslo?"}],
                tools=[WEATHER_TOOL],
                tool_choice={"type": "any"},
            ) as stream,
        ):
            final = await stream.get_final_message()
        assert final.stop_reason == "tool_use", model
        block = final.content[-1]
        assert block.type == "tool_use", model
        assert isinstance(block.input, dict), model
        assert "city" in block.input, model


async def test_count_tokens(gw: Gateway) -> None:
    async with client(gw) as sdk:
        short = await sdk.messages.count_tokens(model=NATIVE, messages=HELLO)
        longer = await sdk.messages.count_tokens(
            model=NATIVE,
            system="You are terse.",
            messages=[{"role": "user", "content": "hello there, how are you doing today?"}],
        )
    assert short.input_tokens > 0
    assert longer.input_tokens > short.input_tokens


async def test_count_tokens_on_an_engine_without_anthropic_api_is_a_clear_400(
    gw: Gateway,
) -> None:
    async with client(gw) as sdk:
        with pytest.raises(anthropic.BadRequestError) as caught:
            await sdk.messages.count_tokens(model=TRANSLATED, messages=HELLO)
    body = caught.value.body
    assert isinstance(body, dict)
    assert body["type"] == "error"
    assert body["error"]["type"] == "invalid_request_error"
    assert "/v1/messages/count_tokens" in body["error"]["message"]


# -- credentials -------------------------------------------------------------------------------


async def test_bearer_token_works_as_well_as_x_api_key(gw: Gateway) -> None:
    async with anthropic.AsyncAnthropic(
        base_url=gw.url, auth_token=ADMIN_KEY, max_retries=0
    ) as sdk:
        message = await sdk.messages.create(model=NATIVE, max_tokens=3, messages=HELLO)
    assert message.usage.output_tokens > 0


async def test_a_wrong_key_is_an_authentication_error_in_anthropics_shape(gw: Gateway) -> None:
    async with client(gw, api_key="sk-not-a-key-of-this-gateway") as sdk:
        with pytest.raises(anthropic.AuthenticationError) as caught:
            await sdk.messages.create(model=NATIVE, max_tokens=3, messages=HELLO)
    body = caught.value.body
    assert isinstance(body, dict)
    assert body["type"] == "error"
    assert body["error"]["type"] == "authentication_error"
    assert set(body["error"]) == {"type", "message"}


async def test_no_credentials_is_401(gw: Gateway) -> None:
    body = {"model": NATIVE, "max_tokens": 3, "messages": HELLO}
    response = await gw.http.post("/v1/messages", json=body)
    assert response.status_code == 401
    assert response.json()["error"]["type"] == "authentication_error"


# -- bad input: 400s in Anthropic's shape, naming the field --------------------------------------


@pytest.mark.parametrize(
    ("body", "named"),
    [
        ({"model": NATIVE, "messages": HELLO}, "max_tokens"),
        ({"model": NATIVE, "max_tokens": 3, "messages": []}, "messages"),
        (
            {"model": NATIVE, "max_tokens": 3, "messages": [{"role": "system", "content": "x"}]},
            "role",
        ),
        ({"model": NATIVE, "max_tokens": 3, "messages": [{"role": "user"}]}, "content"),
        ({"model": NATIVE, "max_tokens": 0, "messages": HELLO}, "max_tokens"),
        ({"model": NATIVE, "max_tokens": 3, "messages": HELLO, "temperature": 1.5}, "temperature"),
        ({"model": NATIVE, "max_tokens": 3, "messages": HELLO, "stop_sequences": "x"}, "stop_"),
    ],
)
async def test_bad_requests(gw: Gateway, body: dict[str, Any], named: str) -> None:
    headers = {"x-api-key": ADMIN_KEY}
    response = await gw.http.post("/v1/messages", json=body, headers=headers)
    assert response.status_code == 400, response.text
    error = response.json()
    assert error["type"] == "error"
    assert error["error"]["type"] == "invalid_request_error"
    assert named in error["error"]["message"]


async def test_unknown_model_is_not_found_in_anthropics_shape(gw: Gateway) -> None:
    async with client(gw) as sdk:
        with pytest.raises(anthropic.NotFoundError) as caught:
            await sdk.messages.create(model="no-such-model", max_tokens=3, messages=HELLO)
    body = caught.value.body
    assert isinstance(body, dict)
    assert body["error"]["type"] == "not_found_error"
    assert "no-such-model" not in body["error"]["message"]  # unknown names are never echoed


async def test_malformed_json_is_a_400_in_anthropics_shape(gw: Gateway) -> None:
    response = await gw.http.post(
        "/v1/messages",
        content=b'{"model": "sim-a", "max_tokens": 3, "messages": [',
        headers={"x-api-key": ADMIN_KEY, "content-type": "application/json"},
    )
    assert response.status_code == 400
    assert response.json()["type"] == "error"


async def test_a_server_tool_cannot_be_translated(gw: Gateway) -> None:
    body = {
        "model": TRANSLATED,
        "max_tokens": 8,
        "messages": HELLO,
        "tools": [{"type": "web_search_20250305", "name": "web_search"}],
    }
    response = await gw.http.post("/v1/messages", json=body, headers={"x-api-key": ADMIN_KEY})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["type"] == "invalid_request_error"
    assert "web_search" in response.json()["error"]["message"]


async def test_anthropic_version_header_is_accepted(gw: Gateway) -> None:
    # What the SDK sends on every request; an older version string is accepted as well.
    response = await gw.http.post(
        "/v1/messages",
        json={"model": NATIVE, "max_tokens": 3, "messages": HELLO},
        headers={"x-api-key": ADMIN_KEY, "anthropic-version": "2023-01-01"},
    )
    assert response.status_code == 200, response.text
    assert response.json()["type"] == "message"
