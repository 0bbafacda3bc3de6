"""Bad requests are refused by the gateway with the OpenAI envelope and never reach the engine."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import openai
import pytest
from prometheus_client import REGISTRY

from tests.helpers.proxy import HELLO, Gateway, gateway, gateway_settings, sim_profile

MAX_TOKENS_CAP = 100
MAX_N = 2
MAX_BODY_BYTES = 4096
MAX_HEADER_BYTES = 2048
CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
EMBEDDINGS = "/v1/embeddings"


@pytest.fixture(scope="module")
async def gw() -> AsyncIterator[Gateway]:
    settings = gateway_settings(
        {"sim-a": sim_profile("sim-a"), "sim-b": sim_profile("sim-b")},
        "sim-a",
        MAX_TOKENS_CAP=MAX_TOKENS_CAP,
        MAX_N=MAX_N,
        MAX_BODY_BYTES=MAX_BODY_BYTES,
        MAX_HEADER_BYTES=MAX_HEADER_BYTES,
    )
    async with gateway(settings) as served:
        yield served


def _chat(**fields: Any) -> dict[str, Any]:
    return {"model": "sim-a", "messages": HELLO, "max_tokens": 4, **fields}


# (path, body, status, error code, param)
BAD_BODIES = {
    "empty messages": (CHAT, _chat(messages=[]), 400, "invalid_request", "messages"),
    "missing messages": (CHAT, {"model": "sim-a"}, 400, "invalid_request", "messages"),
    "bad role": (
        CHAT,
        _chat(messages=[{"role": "wizard", "content": "hi"}]),
        400,
        "invalid_request",
        "messages.0.role",
    ),
    "bad content": (
        CHAT,
        _chat(messages=[*HELLO, {"role": "user", "content": 7}]),
        400,
        "invalid_request",
        "messages.1.content",
    ),
    "negative max_tokens": (CHAT, _chat(max_tokens=-1), 400, "invalid_request", "max_tokens"),
    "max_tokens above the cap": (
        CHAT,
        _chat(max_tokens=MAX_TOKENS_CAP + 1),
        400,
        "invalid_request",
        "max_tokens",
    ),
    "max_completion_tokens above the cap": (
        CHAT,
        _chat(max_completion_tokens=MAX_TOKENS_CAP + 1),
        400,
        "invalid_request",
        "max_completion_tokens",
    ),
    "string max_tokens": (CHAT, _chat(max_tokens="10"), 400, "invalid_request", "max_tokens"),
    "fractional max_tokens": (CHAT, _chat(max_tokens=2.5), 400, "invalid_request", "max_tokens"),
    "stream_options without stream": (
        CHAT,
        _chat(stream_options={"include_usage": True}),
        400,
        "invalid_request",
        "stream_options",
    ),
    "temperature 3": (CHAT, _chat(temperature=3), 400, "invalid_request", "temperature"),
    "top_p 1.5": (CHAT, _chat(top_p=1.5), 400, "invalid_request", "top_p"),
    "n above MAX_N": (CHAT, _chat(n=MAX_N + 1), 400, "invalid_request", "n"),
    "stream not a bool": (CHAT, _chat(stream="yes"), 400, "invalid_request", "stream"),
    "model not a string": (CHAT, _chat(model=5), 400, "invalid_request", "model"),
    "api_base": (CHAT, _chat(api_base="http://evil.test/v1"), 400, "forbidden_field", "api_base"),
    "base_url": (
        COMPLETIONS,
        {"model": "sim-a", "prompt": "hi", "base_url": "http://evil.test/v1"},
        400,
        "forbidden_field",
        "base_url",
    ),
    "api_key": (EMBEDDINGS, {"input": "hi", "api_key": "sk-x"}, 400, "forbidden_field", "api_key"),
    "completion without prompt": (
        COMPLETIONS,
        {"model": "sim-a"},
        400,
        "invalid_request",
        "prompt",
    ),
    "embeddings with empty input": (EMBEDDINGS, {"input": []}, 400, "invalid_request", "input"),
    "embeddings with a list of nulls": (
        EMBEDDINGS,
        {"input": [None, None]},
        400,
        "invalid_request",
        "input",
    ),
    "empty prompt": (COMPLETIONS, {"prompt": ""}, 400, "invalid_request", "prompt"),
    "empty prompt in a list": (
        COMPLETIONS,
        {"prompt": ["a", ""]},
        400,
        "invalid_request",
        "prompt",
    ),
    "prompt mixing text and token ids": (
        COMPLETIONS,
        {"prompt": ["a", [1, 2]]},
        400,
        "invalid_request",
        "prompt",
    ),
    "negative token id": (COMPLETIONS, {"prompt": [1, -2]}, 400, "invalid_request", "prompt"),
    # 1e25 would be an integer no upstream body can carry (it was a 500).
    "token id beyond any vocabulary": (
        EMBEDDINGS,
        {"input": [[1, 1e25]]},
        400,
        "invalid_request",
        "input",
    ),
    "max_tokens of 1e25": (CHAT, _chat(max_tokens=1e25), 400, "invalid_request", "max_tokens"),
    "top_k beyond 64 bits": (CHAT, _chat(top_k=2**70), 400, "invalid_request", "top_k"),
    "fractional top_k": (CHAT, _chat(top_k=2.5), 400, "invalid_request", "top_k"),
    "negative min_tokens": (CHAT, _chat(min_tokens=-1), 400, "invalid_request", "min_tokens"),
    "JSON that is not an object": (CHAT, [1, 2], 400, "invalid_json", None),
    "unknown model": (CHAT, _chat(model="no-such-model"), 404, "model_not_found", "model"),
    "body above MAX_BODY_BYTES": (
        CHAT,
        _chat(messages=[{"role": "user", "content": "x" * MAX_BODY_BYTES}]),
        413,
        "body_too_large",
        None,
    ),
}


@pytest.mark.parametrize("case", list(BAD_BODIES))
async def test_bad_body_is_refused_before_the_engine(gw: Gateway, case: str) -> None:
    path, body, status, code, param = BAD_BODIES[case]
    before = await gw.sim_stats()
    response = await gw.http.post(path, json=body)
    after = await gw.sim_stats()
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code
    assert error["param"] == param
    assert error["message"]
    assert error["type"] == ("not_found_error" if status == 404 else "invalid_request_error")
    assert response.headers["x-error-source"] == "gateway"
    assert after["requests_total"] == before["requests_total"]


@pytest.mark.parametrize(
    ("body", "content_type"),
    [(b"not json", "application/json"), (b'{"messages": [', "application/json"), (b"", "")],
)
async def test_non_json_body_is_400_invalid_json(
    gw: Gateway, body: bytes, content_type: str
) -> None:
    before = await gw.sim_stats()
    response = await gw.http.post(CHAT, content=body, headers={"content-type": content_type})
    after = await gw.sim_stats()
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] == "invalid_json"
    assert error["param"] is None
    assert "JSON" in error["message"]
    assert after["requests_total"] == before["requests_total"]


async def test_huge_header_is_431(gw: Gateway) -> None:
    before = await gw.sim_stats()
    response = await gw.http.post(
        CHAT, json=_chat(), headers={"x-padding": "a" * (MAX_HEADER_BYTES + 100)}
    )
    after = await gw.sim_stats()
    assert response.status_code == 431
    assert response.json()["error"]["code"] == "headers_too_large"
    assert after["requests_total"] == before["requests_total"]


def _answered_413() -> float:
    """How many chat requests the gateway (in this process) has answered with 413."""
    labels = {"route": CHAT, "method": "POST", "status": "413"}
    return REGISTRY.get_sample_value("gateway_http_requests_total", labels) or 0.0


async def test_chunked_body_over_the_cap_is_413_as_soon_as_it_is_over(gw: Gateway) -> None:
    # No Content-Length: the gateway must count the body as it comes and answer once it is
    # over the cap, while the client is still sending, instead of reading it all first.
    answered_before = _answered_413()
    answered_while_sending = False

    async def body() -> AsyncIterator[bytes]:
        nonlocal answered_while_sending
        yield b'{"messages": [{"role": "user", "content": "'
        for _ in range(MAX_BODY_BYTES // 1024 + 2):
            yield b"x" * 1024
        # Over the cap: hold the body open until the gateway has answered (or 5 s).
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and not answered_while_sending:
            await asyncio.sleep(0.02)
            answered_while_sending = _answered_413() > answered_before
        yield b'"}]}'

    before = await gw.sim_stats()
    response = await gw.http.post(
        CHAT, content=body(), headers={"content-type": "application/json"}
    )
    assert "content-length" not in response.request.headers
    assert response.request.headers["transfer-encoding"] == "chunked"
    assert response.status_code == 413, response.text
    assert answered_while_sending
    error = response.json()["error"]
    assert error["code"] == "body_too_large"
    assert error["type"] == "invalid_request_error"
    assert str(MAX_BODY_BYTES) in error["message"]
    assert response.headers["x-error-source"] == "gateway"
    # The gateway is fine afterwards: healthy, and the next request is served.
    assert (await gw.http.get("/health")).status_code == 200
    ok = await gw.http.post(CHAT, json=_chat())
    assert ok.status_code == 200, ok.text
    assert (await gw.sim_stats())["requests_total"] == before["requests_total"] + 1


async def test_the_sdk_sees_the_field_in_param(gw: Gateway) -> None:
    before = await gw.sim_stats()
    async with gw.sdk() as sdk:
        with pytest.raises(openai.BadRequestError) as temperature:
            await sdk.chat.completions.create(model="sim-a", messages=HELLO, temperature=3)
        with pytest.raises(openai.BadRequestError) as n:
            await sdk.chat.completions.create(model="sim-a", messages=HELLO, n=MAX_N + 1)
        with pytest.raises(openai.BadRequestError) as redirect:
            await sdk.chat.completions.create(
                model="sim-a", messages=HELLO, extra_body={"api_base": "http://evil.test/v1"}
            )
        with pytest.raises(openai.NotFoundError) as unknown:
            await sdk.chat.completions.create(model="gpt-17", messages=HELLO)
    after = await gw.sim_stats()
    assert temperature.value.param == "temperature"
    assert n.value.param == "n"
    assert redirect.value.code == "forbidden_field"
    assert redirect.value.param == "api_base"
    assert unknown.value.code == "model_not_found"
    assert "sim-a" in unknown.value.message
    assert after["requests_total"] == before["requests_total"]


async def test_a_valid_request_does_reach_the_engine(gw: Gateway) -> None:
    # The control for the tests above: the counter they compare does move for a good request.
    before = await gw.sim_stats()
    response = await gw.http.post(CHAT, json=_chat(max_tokens=MAX_TOKENS_CAP, n=MAX_N))
    after = await gw.sim_stats()
    assert response.status_code == 200, response.text
    assert len(response.json()["choices"]) == MAX_N
    assert after["requests_total"] == before["requests_total"] + 1


async def test_whole_numbers_written_as_floats_are_integers(gw: Gateway) -> None:
    # JSON Schema reads 4.0 as the integer 4, and so does the gateway; the engine is sent 4
    # (the simulator refuses 4.0, so these answers show what it was sent).
    chat = await gw.http.post(CHAT, json=_chat(max_tokens=4.0, n=1.0))
    assert chat.status_code == 200, chat.text
    assert chat.json()["usage"]["completion_tokens"] <= 4
    completion = await gw.http.post(
        COMPLETIONS, json={"prompt": [[1.0, 2.0], [3]], "max_tokens": 2.0}
    )
    assert completion.status_code == 200, completion.text
    assert len(completion.json()["choices"]) == 2
    embedding = await gw.http.post(EMBEDDINGS, json={"input": [5.0, 6]})
    assert embedding.status_code == 200, embedding.text


async def test_not_loaded_model_without_auto_switch_is_404(gw: Gateway) -> None:
    response = await gw.http.post(CHAT, json=_chat(model="sim-b"))
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "model_not_loaded"
    assert response.json()["error"]["param"] == "model"
    assert "/api/models/switch" in response.json()["error"]["message"]


async def test_openapi_documents_the_openai_routes(gw: Gateway) -> None:
    response = await gw.http.get("/openapi.json")
    assert response.status_code == 200, response.text
    paths = response.json()["paths"]
    for path in (CHAT, COMPLETIONS, EMBEDDINGS):
        operation = paths[path]["post"]
        assert "application/json" in operation["requestBody"]["content"]
        assert {"200", "400", "404", "503"} <= set(operation["responses"])
    assert "/v1/models" in paths
    assert "/lb/status" in paths
