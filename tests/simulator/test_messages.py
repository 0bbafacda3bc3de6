"""The simulator's Anthropic Messages API (``/v1/messages``) as vLLM serves it."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import anthropic
import httpx
import orjson
import pytest
from anthropic.types import Message, MessageParam, ToolParam

from simulator import SimulatorApp, SimulatorConfig, create_simulator_app
from simulator.text import count_tokens

MESSAGES = "/v1/messages"
HELLO = [{"role": "user", "content": "Say hello to the simulator please"}]
WEATHER: ToolParam = {
    "name": "get_weather",
    "description": "Weather of a city",
    "input_schema": {
        "type": "object",
        "properties": {
            "city": {"type": "string"},
            "days": {"type": "integer"},
            "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            "hourly": {"type": "boolean"},
        },
        "required": ["city", "days", "unit"],
    },
}


def make_app(**overrides: Any) -> SimulatorApp:
    """A simulator serving ``sim`` with its test routes."""
    settings: dict[str, Any] = {"model": "sim-model", "served_model_names": ("sim",)}
    settings["test_routes"] = True
    settings.update(overrides)
    return create_simulator_app(SimulatorConfig(**settings))


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    """A client talking to a fresh simulator in-process."""
    transport = httpx.ASGITransport(app=make_app())
    async with httpx.AsyncClient(transport=transport, base_url="http://sim") as c:
        yield c


@pytest.fixture
async def sdk() -> AsyncIterator[anthropic.AsyncAnthropic]:
    """The official Anthropic SDK pointed at a fresh simulator in-process."""
    transport = httpx.ASGITransport(app=make_app())
    http = httpx.AsyncClient(transport=transport, base_url="http://sim")
    async with anthropic.AsyncAnthropic(
        api_key="x", base_url="http://sim", http_client=http
    ) as client:
        yield client


def named_events(body: str) -> list[tuple[str, dict[str, Any]]]:
    """``(event name, data)`` of an SSE body whose every event has an ``event:`` line."""
    events = []
    for block in body.split("\n\n"):
        if block:
            name, data = block.split("\n")
            assert name.startswith("event: "), block
            assert data.startswith("data: "), block
            events.append((name[len("event: ") :], orjson.loads(data[len("data: ") :])))
    return events


async def test_plain_message_validates_as_anthropic_message(client: httpx.AsyncClient) -> None:
    body = {"model": "sim", "max_tokens": 200, "messages": HELLO, "system": "Be kind"}
    reply = await client.post(MESSAGES, json=body)
    assert reply.status_code == 200, reply.text
    message = Message.model_validate(reply.json())
    assert message.id.startswith("chatcmpl-")  # vLLM reuses the chat completion's id
    assert message.type == "message"
    assert message.role == "assistant"
    assert message.model == "sim"
    assert message.stop_reason == "end_turn"
    [block] = message.content
    assert block.type == "text"
    # system (4 + 2) + user (4 + 6) + priming 3, as chat counts them
    assert message.usage.input_tokens == 19
    assert message.usage.output_tokens == count_tokens(block.text)
    assert "stop_sequence" not in reply.json()  # vLLM leaves out what is None
    chat = await client.post(
        "/v1/chat/completions",
        json={"messages": [{"role": "system", "content": "Be kind"}, *HELLO]},
    )
    assert chat.json()["choices"][0]["message"]["content"] == block.text
    count = await client.post(
        "/v1/messages/count_tokens",
        json={"model": "sim", "messages": HELLO, "system": "Be kind"},
    )
    assert count.json() == {"input_tokens": 19, "context_management": {"original_input_tokens": 19}}


async def test_max_tokens_and_stop_sequences(client: httpx.AsyncClient) -> None:
    cut = await client.post(MESSAGES, json={"model": "sim", "max_tokens": 3, "messages": HELLO})
    assert cut.json()["stop_reason"] == "max_tokens"
    assert cut.json()["usage"]["output_tokens"] == 3
    full = await client.post(MESSAGES, json={"model": "sim", "max_tokens": 100, "messages": HELLO})
    words = full.json()["content"][0]["text"].split()
    stop = words[3]
    stopped = await client.post(
        MESSAGES,
        json={"model": "sim", "max_tokens": 100, "messages": HELLO, "stop_sequences": [stop]},
    )
    body = stopped.json()
    assert body["stop_reason"] == "stop_sequence"
    assert body["stop_sequence"] == stop
    kept = body["content"][0]["text"]
    assert stop not in kept
    assert kept.split() == words[: words.index(stop)]
    assert body["usage"]["output_tokens"] == count_tokens(kept)


async def test_stream_is_vllms_event_sequence(client: httpx.AsyncClient) -> None:
    body = {"model": "sim", "max_tokens": 4, "messages": HELLO, "stream": True}
    reply = await client.post(MESSAGES, json=body)
    assert reply.headers["content-type"].startswith("text/event-stream")
    assert "[DONE]" not in reply.text
    events = named_events(reply.text)
    assert [name for name, _ in events] == [
        "message_start",
        "content_block_start",
        *["content_block_delta"] * 4,
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    assert all(data["type"] == name for name, data in events)
    start = events[0][1]["message"]
    assert start["content"] == []
    assert start["usage"] == {"input_tokens": 13, "output_tokens": 0}
    assert events[1][1] == {
        "type": "content_block_start",
        "content_block": {"type": "text", "text": ""},
        "index": 0,
    }
    assert {data["delta"]["type"] for _, data in events[2:6]} == {"text_delta"}
    assert events[-2][1] == {
        "type": "message_delta",
        "delta": {"stop_reason": "max_tokens", "stop_sequence": None},
        "usage": {"input_tokens": 13, "output_tokens": 4},
    }
    assert events[-1][1] == {"type": "message_stop"}


async def test_sdk_streams_a_tool_round_trip(sdk: anthropic.AsyncAnthropic) -> None:
    question: list[MessageParam] = [{"role": "user", "content": "What is the weather in Oslo?"}]
    async with sdk.messages.stream(
        model="sim",
        max_tokens=100,
        messages=question,
        tools=[WEATHER],
        tool_choice={"type": "tool", "name": "get_weather"},
    ) as stream:
        kinds = [event.type async for event in stream]
        first = await stream.get_final_message()
    assert "input_json" in kinds
    assert first.stop_reason == "tool_use"
    [call] = first.content
    assert call.type == "tool_use"
    assert call.id.startswith("chatcmpl-tool-")
    assert call.name == "get_weather"
    assert call.input == {"city": "simulated", "days": 1, "unit": "celsius"}
    assert first.usage.output_tokens == 6  # '{"city":', ' "simulated",', ...: one token each
    follow_up: list[MessageParam] = [
        *question,
        {"role": "assistant", "content": [call.model_dump()]},  # type: ignore[list-item]
        {
            "role": "user",
            "content": [{"type": "tool_result", "tool_use_id": call.id, "content": "Sunny"}],
        },
    ]
    answer = await sdk.messages.create(
        model="sim",
        max_tokens=100,
        messages=follow_up,
        tools=[WEATHER],
        tool_choice={"type": "any"},
    )
    assert answer.stop_reason in ("end_turn", "max_tokens")
    [block] = answer.content
    assert block.type == "text"
    assert block.text
    # The earlier call and its result are in the prompt.
    assert answer.usage.input_tokens > first.usage.input_tokens + 6


async def test_any_tool_choice_calls_the_first_tool(client: httpx.AsyncClient) -> None:
    other: dict[str, Any] = {"name": "noop", "input_schema": {"type": "object"}}
    body = {
        "model": "sim",
        "max_tokens": 50,
        "messages": HELLO,
        "tools": [other, WEATHER],
        "tool_choice": {"type": "any"},
    }
    message = Message.model_validate((await client.post(MESSAGES, json=body)).json())
    assert message.stop_reason == "tool_use"
    [call] = message.content
    assert call.type == "tool_use"
    assert (call.name, call.input) == ("noop", {})
    auto = await client.post(MESSAGES, json={**body, "tool_choice": {"type": "auto"}})
    assert auto.json()["content"][0]["type"] == "text"


async def test_errors_in_the_messages_shape(client: httpx.AsyncClient) -> None:
    cases = [
        ({"model": "sim", "messages": HELLO}, 400, "BadRequestError", "max_tokens: Field required"),
        ({"model": "nope", "max_tokens": 5, "messages": HELLO}, 404, "NotFoundError", None),
        (
            {"model": "sim", "max_tokens": 5, "messages": HELLO, "tool_choice": {"type": "any"}},
            400,
            "BadRequestError",
            "When using `tool_choice`, `tools` must be set.",
        ),
        (
            {
                "model": "sim",
                "max_tokens": 5,
                "messages": HELLO,
                "tools": [WEATHER],
                "tool_choice": {"type": "tool", "name": "other"},
            },
            400,
            "BadRequestError",
            None,
        ),
        ({"model": "sim", "max_tokens": 5000, "messages": HELLO}, 400, "BadRequestError", None),
    ]
    for body, status, kind, message in cases:
        reply = await client.post(MESSAGES, json=body)
        assert reply.status_code == status, body
        error = reply.json()
        assert error["type"] == "error"
        assert set(error["error"]) == {"type", "message"}
        assert error["error"]["type"] == kind
        if message is not None:
            assert error["error"]["message"] == message
    forced = await client.post(
        MESSAGES,
        json={"model": "sim", "max_tokens": 5, "messages": HELLO},
        headers={"X-Simulator-Status": "529"},
    )
    assert forced.status_code == 529
    assert forced.json()["type"] == "error"
    stats = (await client.get("/simulator/stats")).json()
    assert stats["requests_by_path"] == {MESSAGES: 6}
    assert stats["rejected_total"] == 5


async def test_injected_error_ends_the_stream_with_an_error_event(
    client: httpx.AsyncClient,
) -> None:
    reply = await client.post(
        MESSAGES,
        json={"model": "sim", "max_tokens": 50, "messages": HELLO, "stream": True},
        headers={"X-Simulator-Error-After-Chunks": "1"},
    )
    events = named_events(reply.text)
    assert [name for name, _ in events] == [
        "message_start",
        "content_block_start",
        "content_block_delta",
        "error",
    ]
    assert events[-1][1]["error"]["type"] == "internal_error"
    plain = await client.post(
        MESSAGES,
        json={"model": "sim", "max_tokens": 50, "messages": HELLO},
        headers={"X-Simulator-Error-After-Chunks": "1"},
    )
    assert plain.status_code == 500
    assert plain.json()["error"]["type"] == "InternalServerError"
