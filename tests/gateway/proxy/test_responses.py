"""OpenAI's Responses API through the gateway, with the official `openai` SDK unchanged.

The simulator engine implements the subset vLLM serves; its events pass through the gateway
with their names, as they come. Responses are not stored (vLLM's store is off), so reading one
back is a 404 and a request that needs a stored one a 400.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import openai
import pytest

from tests.helpers.proxy import AUTH, Gateway, gateway, gateway_settings, sim_profile

IGNORE_EOS = {"ignore_eos": True}


@pytest.fixture(scope="module")
async def gw() -> AsyncIterator[Gateway]:
    profiles = {
        "sim-a": sim_profile("sim-a", aliases=("model-a",)),
        # An engine whose profile lists no Responses API (an OpenAI-compatible server
        # without it): the gateway refuses the route for it rather than relaying a 404.
        "sim-c": sim_profile("sim-c", "--without-api", "responses", apis=()),
    }
    async with gateway(gateway_settings(profiles, "sim-a")) as served:
        yield served


async def test_response(gw: Gateway) -> None:
    async with gw.sdk() as sdk:
        response = await sdk.responses.create(
            model="sim-a", input="hello there", max_output_tokens=7, extra_body=IGNORE_EOS
        )
    assert response.object == "response"
    assert response.model == "sim-a"
    assert response.output_text
    assert response.usage is not None
    assert response.usage.output_tokens == 7
    assert response.usage.input_tokens > 0
    assert response.usage.total_tokens == response.usage.input_tokens + 7


async def test_alias_and_input_items(gw: Gateway) -> None:
    async with gw.sdk() as sdk:
        response = await sdk.responses.create(
            model="model-a",
            instructions="Be brief.",
            input=[{"role": "user", "content": "hello there"}],
            max_output_tokens=4,
            extra_body=IGNORE_EOS,
        )
    assert response.usage is not None
    assert response.usage.output_tokens == 4


async def test_stream_passes_the_named_events_through(gw: Gateway) -> None:
    async with gw.sdk() as sdk:
        stream = await sdk.responses.create(
            model="sim-a", input="hello", max_output_tokens=5, stream=True, extra_body=IGNORE_EOS
        )
        events = [event async for event in stream]
    types = [event.type for event in events]
    assert types[0] == "response.created"
    assert types[-1] in ("response.completed", "response.incomplete")
    deltas = [event.delta for event in events if event.type == "response.output_text.delta"]
    assert len(deltas) == 5
    final = events[-1]
    assert final.type in ("response.completed", "response.incomplete")
    assert final.response.usage is not None
    assert final.response.usage.output_tokens == 5
    assert final.response.output_text == "".join(deltas)


async def test_raw_stream_keeps_event_lines(gw: Gateway) -> None:
    body = {"model": "sim-a", "input": "hello", "max_output_tokens": 3, "stream": True}
    async with gw.http.stream("POST", "/v1/responses", json=body) as response:
        assert response.status_code == 200
        text = "".join([chunk async for chunk in response.aiter_text()])
    names = [line[7:] for line in text.splitlines() if line.startswith("event: ")]
    assert names[0] == "response.created"
    assert "response.output_text.delta" in names
    assert names[-1] in ("response.completed", "response.incomplete")
    assert text.count("data: ") == len(names)


async def test_stored_responses_are_404(gw: Gateway) -> None:
    async with gw.sdk() as sdk:
        with pytest.raises(openai.NotFoundError) as caught:
            await sdk.responses.retrieve("resp_0123")
        with pytest.raises(openai.NotFoundError):
            await sdk.responses.cancel("resp_0123")
        with pytest.raises(openai.NotFoundError):
            await sdk.responses.delete("resp_0123")
    body = caught.value.body
    assert isinstance(body, dict)
    assert body["code"] == "response_not_found"
    assert "not stored" in body["message"]


@pytest.mark.parametrize(
    ("body", "param", "code"),
    [
        ({"model": "sim-a"}, "input", "invalid_request"),
        ({"model": "sim-a", "input": ""}, "input", "invalid_request"),
        ({"model": "sim-a", "input": [1]}, "input.0", "invalid_request"),
        ({"model": "sim-a", "input": "x", "max_output_tokens": 0}, "max_output_tokens", None),
        ({"model": "sim-a", "input": "x", "previous_response_id": "resp_1"}, None, None),
        ({"model": "sim-a", "input": "x", "background": True}, "background", None),
        ({"model": "sim-a", "input": "x", "stream": "yes"}, "stream", "invalid_request"),
    ],
)
async def test_bad_requests(
    gw: Gateway, body: dict[str, Any], param: str | None, code: str | None
) -> None:
    response = await gw.http.post("/v1/responses", json=body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    if param is not None:
        assert error["param"] == param
    if code is not None:
        assert error["code"] == code
    if "previous_response_id" in body or "background" in body:
        assert error["code"] == "responses_not_stored"


async def test_an_engine_without_the_api_gets_a_clear_400(gw: Gateway) -> None:
    loaded = await gw.http.post("/api/models/sim-c/load", headers=AUTH)
    assert loaded.status_code == 202, loaded.text
    await gw.wait_ready("sim-c")
    async with gw.sdk() as sdk:
        with pytest.raises(openai.BadRequestError) as caught:
            await sdk.responses.create(model="sim-c", input="hello", max_output_tokens=3)
        # Chat still works on it: only the route it does not serve is refused.
        chat = await sdk.chat.completions.create(
            model="sim-c", messages=[{"role": "user", "content": "hi"}], max_tokens=2
        )
    assert chat.choices[0].message.content
    body = caught.value.body
    assert isinstance(body, dict)
    assert body["code"] == "route_not_served"
    assert "/v1/responses" in body["message"]
