"""The simulator's OpenAI Responses API (``/v1/responses``), in vLLM's shapes."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
import openai
import orjson
import pytest
from openai.types.responses import Response, ResponseStreamEvent
from pydantic import TypeAdapter

from simulator import SimulatorApp, SimulatorConfig, create_simulator_app
from simulator.text import count_tokens

RESPONSES = "/v1/responses"
STREAM_EVENTS: TypeAdapter[ResponseStreamEvent] = TypeAdapter(ResponseStreamEvent)


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


def named_events(body: str) -> list[tuple[str, dict[str, Any]]]:
    """``(event name, data)`` of an SSE body whose every event has an ``event:`` line."""
    events: list[tuple[str, dict[str, Any]]] = []
    for block in body.split("\n\n"):
        if not block:
            continue
        lines = block.split("\n")
        assert len(lines) == 2, block
        assert lines[0].startswith("event: "), block
        assert lines[1].startswith("data: "), block
        events.append((lines[0][len("event: ") :], orjson.loads(lines[1][len("data: ") :])))
    assert body.endswith("\n\n")
    return events


async def test_plain_response_validates_as_openai_response(client: httpx.AsyncClient) -> None:
    reply = await client.post(
        RESPONSES, json={"model": "sim", "input": "Tell me a story", "instructions": "Be brief"}
    )
    assert reply.status_code == 200, reply.text
    response = Response.model_validate(reply.json())
    assert response.id.startswith("resp_")
    assert response.object == "response"
    assert response.status == "completed"
    assert response.incomplete_details is None
    assert response.instructions == "Be brief"
    assert response.model == "sim"
    [item] = response.output
    assert item.type == "message"
    assert item.role == "assistant"
    assert item.id.startswith("msg_")
    [part] = item.content
    assert part.type == "output_text"
    assert part.text == response.output_text
    usage = response.usage
    assert usage is not None
    # Counted as chat counts the same two messages: 2 x (4 + words) + 3 priming.
    assert usage.input_tokens == (4 + 2) + (4 + 4) + 3
    assert usage.output_tokens == count_tokens(part.text)
    assert usage.total_tokens == usage.input_tokens + usage.output_tokens
    assert usage.input_tokens_details.cached_tokens == 0
    assert usage.output_tokens_details.reasoning_tokens == 0


async def test_same_conversation_costs_what_chat_reports(client: httpx.AsyncClient) -> None:
    items = [
        {"role": "user", "content": [{"type": "input_text", "text": "first question here"}]},
        {"role": "assistant", "content": "an answer"},
        {"role": "user", "content": "and a follow up"},
    ]
    chat_messages = [
        {"role": "user", "content": "first question here"},
        {"role": "assistant", "content": "an answer"},
        {"role": "user", "content": "and a follow up"},
    ]
    reply = (await client.post(RESPONSES, json={"input": items})).json()
    chat = (await client.post("/v1/chat/completions", json={"messages": chat_messages})).json()
    assert reply["usage"]["input_tokens"] == chat["usage"]["prompt_tokens"]
    # The same conversation gets the same reply.
    assert reply["output"][0]["content"][0]["text"] == chat["choices"][0]["message"]["content"]


async def test_cut_by_max_output_tokens_is_incomplete(client: httpx.AsyncClient) -> None:
    reply = await client.post(RESPONSES, json={"input": "hello", "max_output_tokens": 3})
    response = Response.model_validate(reply.json())
    assert response.status == "incomplete"
    assert response.incomplete_details is not None
    assert response.incomplete_details.reason == "max_output_tokens"
    assert response.max_output_tokens == 3
    assert response.usage is not None
    assert response.usage.output_tokens == 3
    assert count_tokens(response.output_text) == 3


async def test_ignore_eos_runs_to_the_cap(client: httpx.AsyncClient) -> None:
    body = {"input": "hello", "max_output_tokens": 300, "ignore_eos": True}
    response = Response.model_validate((await client.post(RESPONSES, json=body)).json())
    assert response.usage is not None
    assert response.usage.output_tokens == 300
    assert response.status == "incomplete"


async def test_stream_is_vllms_event_sequence(client: httpx.AsyncClient) -> None:
    reply = await client.post(
        RESPONSES, json={"input": "hello there", "max_output_tokens": 5, "stream": True}
    )
    assert reply.status_code == 200
    assert reply.headers["content-type"].startswith("text/event-stream")
    assert "[DONE]" not in reply.text
    events = named_events(reply.text)
    names = [name for name, _ in events]
    assert names == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        *["response.output_text.delta"] * 5,
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    for index, (name, data) in enumerate(events):
        assert data["type"] == name
        assert data["sequence_number"] == index
        STREAM_EVENTS.validate_python(data)  # each event is one the OpenAI SDK knows
    deltas = "".join(data["delta"] for name, data in events if name.endswith(".delta"))
    assert events[-4][1]["text"] == deltas
    created = Response.model_validate(events[0][1]["response"])
    assert created.status == "in_progress"
    assert created.usage is None
    completed = Response.model_validate(events[-1][1]["response"])
    assert completed.id == created.id
    assert completed.status == "incomplete"
    assert completed.output_text == deltas
    assert completed.usage is not None
    assert completed.usage.output_tokens == 5
    assert completed.usage.input_tokens == 4 + 2 + 3


async def test_openai_sdk_streams_against_the_simulator() -> None:
    transport = httpx.ASGITransport(app=make_app())
    http = httpx.AsyncClient(transport=transport, base_url="http://sim/v1")
    async with openai.AsyncOpenAI(api_key="x", base_url="http://sim/v1", http_client=http) as sdk:
        plain = await sdk.responses.create(model="sim", input="hi there", max_output_tokens=4)
        assert plain.usage is not None
        assert plain.usage.output_tokens == 4
        stream = await sdk.responses.create(model="sim", input="hi there", stream=True)
        kinds = [event.type async for event in stream]
    assert kinds[0] == "response.created"
    assert kinds[-1] == "response.completed"
    assert kinds.count("response.output_text.delta") >= 16


async def test_errors_and_accounting(client: httpx.AsyncClient) -> None:
    missing = await client.post(RESPONSES, json={"model": "sim"})
    assert missing.status_code == 400
    assert missing.json()["message"] == "input: Field required"
    unknown = await client.post(RESPONSES, json={"model": "nope", "input": "x"})
    assert unknown.status_code == 404
    too_long = await client.post(RESPONSES, json={"input": "word " * 5000})
    assert too_long.status_code == 400
    assert "max_model_len 4096" in too_long.json()["message"]
    ok = await client.post(RESPONSES, json={"input": "x"}, headers={"X-Request-Id": "abc"})
    assert ok.json()["id"] == "resp_abc"
    stats = (await client.get("/simulator/stats")).json()
    assert stats["requests_by_path"] == {RESPONSES: 4}
    assert stats["rejected_total"] == 3
    assert stats["completed_total"] == 1
    recent = (await client.get("/simulator/requests")).json()
    assert recent["paths"][-1] == RESPONSES
    assert recent["data"][-1] == {"input": "x"}


async def test_injected_error_ends_the_stream_with_an_error_event(
    client: httpx.AsyncClient,
) -> None:
    reply = await client.post(
        RESPONSES,
        json={"input": "hello", "stream": True},
        headers={"X-Simulator-Error-After-Chunks": "2"},
    )
    events = named_events(reply.text)
    assert [name for name, _ in events][-3:] == [
        "response.output_text.delta",
        "response.output_text.delta",
        "error",
    ]
    STREAM_EVENTS.validate_python(events[-1][1])
    stats = (await client.get("/simulator/stats")).json()
    assert stats["failed_total"] == 1
    assert stats["generation_tokens_total"] == 2


async def test_retrieve_and_cancel_answer_as_vllm_without_a_store(
    client: httpx.AsyncClient,
) -> None:
    lookups = (("GET", "/v1/responses/resp_123"), ("POST", "/v1/responses/resp_123/cancel"))
    for method, path in lookups:
        reply = await client.request(method, path)
        assert reply.status_code == 404
        assert reply.json() == {
            "object": "error",
            "message": "Response with id 'resp_123' not found.",
            "type": "invalid_request_error",
            "param": "response_id",
            "code": 404,
        }
    assert (await client.delete("/v1/responses/resp_123")).status_code == 405
    assert (await client.get("/v1/responses/a/b")).status_code == 404
