"""In-process tests of the vLLM engine simulator's HTTP surface (httpx + ASGITransport)."""

from __future__ import annotations

import base64
import gc
import math
import struct
import time
import types
from collections.abc import AsyncIterator
from typing import Any

import httpx
import orjson
import pytest

from simulator import (
    SIMULATOR_OWNER,
    SimulatorApp,
    SimulatorConfig,
    create_simulator_app,
)
from simulator.__main__ import build_parser, config_from_args
from simulator.errors import SimulatedConnectionDrop
from simulator.text import count_tokens, render_text, token_ids

CHAT = "/v1/chat/completions"
HELLO = [{"role": "user", "content": "Say hello to the simulator please"}]


def make_app(**overrides: Any) -> SimulatorApp:
    """A simulator app serving ``sim-model`` as ``sim`` and ``sim-alias``, with its test routes
    (these tests read its counters and inject faults) unless ``test_routes=False``."""
    settings: dict[str, Any] = {
        "model": "sim-model",
        "served_model_names": ("sim", "sim-alias"),
        "test_routes": True,
    }
    settings.update(overrides)
    return create_simulator_app(SimulatorConfig(**settings))


def client_for(app: SimulatorApp) -> httpx.AsyncClient:
    """An httpx client talking to ``app`` in-process."""
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://sim")


@pytest.fixture
async def app() -> SimulatorApp:
    """A fresh simulator app with default settings."""
    return make_app()


@pytest.fixture
async def client(app: SimulatorApp) -> AsyncIterator[httpx.AsyncClient]:
    """A client for the ``app`` fixture."""
    async with client_for(app) as c:
        yield c


def sse_events(body: str) -> list[Any]:
    """The decoded ``data:`` payloads of an SSE body (``[DONE]`` kept as a string)."""
    events: list[Any] = []
    for line in body.split("\n"):
        if line.startswith("data: "):
            payload = line[len("data: ") :]
            events.append(payload if payload == "[DONE]" else orjson.loads(payload))
        else:
            assert line == "", f"unexpected SSE line {line!r}"
    return events


def assert_vllm_error(response: httpx.Response, status: int, err_type: str) -> str:
    """Check vLLM's error shape and return the message."""
    assert response.status_code == status
    body = response.json()
    assert set(body) == {"object", "message", "type", "param", "code"}
    assert body["object"] == "error"
    assert body["type"] == err_type
    assert body["param"] is None
    assert body["code"] == status
    assert isinstance(body["message"], str)
    assert body["message"]
    return str(body["message"])


# --- discovery, health -------------------------------------------------------------------------


async def test_models_lists_every_served_name_as_simulator(client: httpx.AsyncClient) -> None:
    response = await client.get("/v1/models")
    assert response.status_code == 200
    body = response.json()
    assert body["object"] == "list"
    assert [m["id"] for m in body["data"]] == ["sim", "sim-alias"]
    for model in body["data"]:
        assert model["object"] == "model"
        assert model["owned_by"] == SIMULATOR_OWNER == "vllm-chat-gateway-simulator"
        assert model["root"] == "sim-model"
        assert model["max_model_len"] == 4096
        assert isinstance(model["created"], int)


async def test_health_ping_version_say_simulator(client: httpx.AsyncClient) -> None:
    health = await client.get("/health")
    assert health.status_code == 200
    assert health.json()["simulator"] is True
    assert (await client.get("/ping")).status_code == 200
    version = (await client.get("/version")).json()
    assert "simulator" in version["version"]
    assert version["simulator"] is True


async def test_unknown_path_and_wrong_method(client: httpx.AsyncClient) -> None:
    assert (await client.get("/nope")).status_code == 404
    wrong = await client.get(CHAT)
    assert wrong.status_code == 405
    assert wrong.headers["allow"] == "POST"


# --- chat --------------------------------------------------------------------------------------


async def test_chat_non_stream_has_vllm_shape(client: httpx.AsyncClient) -> None:
    response = await client.post(CHAT, json={"model": "sim-alias", "messages": HELLO})
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert body["id"].startswith("chatcmpl-")
    assert body["object"] == "chat.completion"
    assert isinstance(body["created"], int)
    assert body["model"] == "sim-alias"
    [choice] = body["choices"]
    assert choice["index"] == 0
    assert choice["logprobs"] is None
    assert choice["finish_reason"] == "stop"
    assert choice["message"]["role"] == "assistant"
    content = choice["message"]["content"]
    usage = body["usage"]
    assert usage["completion_tokens"] == count_tokens(content) > 0
    # 6 words + 4 per message + 3 for the reply priming.
    assert usage["prompt_tokens"] == 13
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    again = await client.post(CHAT, json={"model": "sim", "messages": HELLO})
    assert again.json()["choices"][0]["message"]["content"] == content


async def test_chat_model_defaults_to_first_served_name(client: httpx.AsyncClient) -> None:
    response = await client.post(CHAT, json={"messages": HELLO, "max_tokens": 2})
    assert response.json()["model"] == "sim"


@pytest.mark.parametrize("field", ["max_tokens", "max_completion_tokens"])
async def test_max_tokens_is_honoured(client: httpx.AsyncClient, field: str) -> None:
    response = await client.post(CHAT, json={"model": "sim", "messages": HELLO, field: 7})
    body = response.json()
    assert body["usage"]["completion_tokens"] == 7
    assert body["choices"][0]["finish_reason"] == "length"
    assert count_tokens(body["choices"][0]["message"]["content"]) == 7


async def test_natural_end_is_stop_and_ignore_eos_runs_to_max_tokens() -> None:
    async with client_for(make_app(response_tokens=5)) as client:
        short = (await client.post(CHAT, json={"messages": HELLO, "max_tokens": 50})).json()
        assert short["usage"]["completion_tokens"] == 5
        assert short["choices"][0]["finish_reason"] == "stop"
        body = {"messages": HELLO, "max_tokens": 50, "ignore_eos": True}
        long = (await client.post(CHAT, json=body)).json()
        assert long["usage"]["completion_tokens"] == 50
        assert long["choices"][0]["finish_reason"] == "length"


async def test_chat_stream_has_vllm_chunk_sequence(client: httpx.AsyncClient) -> None:
    response = await client.post(
        CHAT, json={"model": "sim", "messages": HELLO, "max_tokens": 5, "stream": True}
    )
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/event-stream; charset=utf-8"
    events = sse_events(response.text)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert len(chunks) == 1 + 5 + 1
    assert len({c["id"] for c in chunks}) == 1
    assert chunks[0]["id"].startswith("chatcmpl-")
    for chunk in chunks:
        assert chunk["object"] == "chat.completion.chunk"
        assert chunk["model"] == "sim"
        assert isinstance(chunk["created"], int)
        assert "usage" not in chunk
    assert chunks[0]["choices"] == [
        {
            "index": 0,
            "delta": {"role": "assistant", "content": ""},
            "logprobs": None,
            "finish_reason": None,
        }
    ]
    words = [c["choices"][0]["delta"]["content"] for c in chunks[1:6]]
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[1:6])
    assert all(count_tokens(w) == 1 for w in words)
    assert chunks[6]["choices"][0]["finish_reason"] == "length"
    assert chunks[6]["choices"][0]["delta"] == {}
    non_stream = await client.post(CHAT, json={"model": "sim", "messages": HELLO, "max_tokens": 5})
    assert "".join(words) == non_stream.json()["choices"][0]["message"]["content"]


async def test_include_usage_adds_a_final_usage_chunk_only_when_asked(
    client: httpx.AsyncClient,
) -> None:
    body = {
        "messages": HELLO,
        "max_tokens": 4,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    events = sse_events((await client.post(CHAT, json=body)).text)
    assert events[-1] == "[DONE]"
    usage_chunk = events[-2]
    assert usage_chunk["choices"] == []
    assert usage_chunk["usage"] == {"prompt_tokens": 13, "completion_tokens": 4, "total_tokens": 17}
    assert all("usage" not in e for e in events[:-2])
    body["stream_options"] = {"include_usage": False}
    events = sse_events((await client.post(CHAT, json=body)).text)
    assert all("usage" not in e for e in events[:-1])
    assert events[-2]["choices"][0]["finish_reason"] == "length"


async def test_n_choices(client: httpx.AsyncClient) -> None:
    body: dict[str, Any] = {"messages": HELLO, "max_tokens": 3, "n": 3}
    result = (await client.post(CHAT, json=body)).json()
    assert [c["index"] for c in result["choices"]] == [0, 1, 2]
    assert result["usage"]["completion_tokens"] == 9
    contents = {c["message"]["content"] for c in result["choices"]}
    assert len(contents) == 3
    body.update(n=2, stream=True)
    events = sse_events((await client.post(CHAT, json=body)).text)[:-1]
    per_index: dict[int, list[str]] = {0: [], 1: []}
    finishes = {}
    for event in events:
        [choice] = event["choices"]
        if choice["finish_reason"] is not None:
            finishes[choice["index"]] = choice["finish_reason"]
        elif "role" not in choice["delta"]:
            per_index[choice["index"]].append(choice["delta"]["content"])
    assert finishes == {0: "length", 1: "length"}
    assert [len(v) for v in per_index.values()] == [3, 3]


async def test_tokens_per_second_paces_the_stream() -> None:
    async with client_for(make_app(tokens_per_second=100)) as client:
        started = time.perf_counter()
        response = await client.post(
            CHAT, json={"messages": HELLO, "max_tokens": 11, "stream": True}
        )
        elapsed = time.perf_counter() - started
    assert len(sse_events(response.text)) == 1 + 11 + 1 + 1
    assert 0.095 <= elapsed < 2.0


async def test_pacing_applies_to_non_streamed_requests_and_first_token_delay() -> None:
    async with client_for(make_app(tokens_per_second=100)) as client:
        started = time.perf_counter()
        response = await client.post(CHAT, json={"messages": HELLO, "max_tokens": 11})
        assert response.json()["usage"]["completion_tokens"] == 11
        assert time.perf_counter() - started >= 0.095
        started = time.perf_counter()
        await client.post(
            CHAT,
            json={"messages": HELLO, "max_tokens": 3, "stream": True},
            headers={"X-Simulator-Tokens-Per-Second": "0", "X-Simulator-First-Token-Delay": "0.2"},
        )
        assert 0.2 <= time.perf_counter() - started < 0.5


async def test_request_id_header_is_echoed(client: httpx.AsyncClient) -> None:
    response = await client.post(
        CHAT, json={"messages": HELLO, "max_tokens": 1}, headers={"X-Request-Id": "abc123"}
    )
    assert response.headers["x-request-id"] == "abc123"
    assert response.json()["id"] == "chatcmpl-abc123"


# --- completions and embeddings ----------------------------------------------------------------


async def test_completions_single_and_list_prompts(client: httpx.AsyncClient) -> None:
    single = (await client.post("/v1/completions", json={"prompt": "one two three"})).json()
    assert single["id"].startswith("cmpl-")
    assert single["object"] == "text_completion"
    [choice] = single["choices"]
    assert set(choice) >= {"index", "text", "logprobs", "finish_reason"}
    assert single["usage"]["completion_tokens"] == 16 == count_tokens(choice["text"])
    assert single["usage"]["prompt_tokens"] == 3

    many = await client.post(
        "/v1/completions", json={"prompt": ["a b", "c d e"], "max_tokens": 2, "n": 2}
    )
    body = many.json()
    assert [c["index"] for c in body["choices"]] == [0, 1, 2, 3]
    assert body["usage"] == {
        "prompt_tokens": 5,
        "completion_tokens": 8,
        "total_tokens": 13,
        "prompt_tokens_details": None,
    }


async def test_completions_stream(client: httpx.AsyncClient) -> None:
    response = await client.post(
        "/v1/completions",
        json={
            "prompt": "hello",
            "max_tokens": 3,
            "stream": True,
            "stream_options": {"include_usage": True},
        },
    )
    events = sse_events(response.text)
    assert events[-1] == "[DONE]"
    assert events[-2]["usage"]["completion_tokens"] == 3
    assert events[-2]["choices"] == []
    texts = [e["choices"][0]["text"] for e in events[:3]]
    assert all(e["object"] == "text_completion" for e in events[:-1])
    assert all(count_tokens(t) == 1 for t in texts)
    assert events[3]["choices"][0]["finish_reason"] == "length"


async def test_embeddings_float_and_base64(client: httpx.AsyncClient) -> None:
    floats = (await client.post("/v1/embeddings", json={"input": ["alpha", "beta"]})).json()
    assert floats["object"] == "list"
    assert floats["model"] == "sim"
    assert [d["index"] for d in floats["data"]] == [0, 1]
    first = floats["data"][0]["embedding"]
    assert len(first) == 64
    assert math.isclose(math.sqrt(sum(v * v for v in first)), 1.0, rel_tol=1e-9)
    assert first != floats["data"][1]["embedding"]
    assert floats["usage"]["prompt_tokens"] == 2
    assert floats["usage"]["completion_tokens"] == 0

    encoded = (
        await client.post("/v1/embeddings", json={"input": "alpha", "encoding_format": "base64"})
    ).json()
    raw = base64.b64decode(encoded["data"][0]["embedding"])
    decoded = struct.unpack("<64f", raw)
    assert all(math.isclose(a, b, abs_tol=1e-6) for a, b in zip(decoded, first, strict=True))

    short = (await client.post("/v1/embeddings", json={"input": "alpha", "dimensions": 8})).json()
    vector = short["data"][0]["embedding"]
    assert len(vector) == 8
    assert math.isclose(math.sqrt(sum(v * v for v in vector)), 1.0, rel_tol=1e-9)


async def test_embedding_dim_is_configurable() -> None:
    async with client_for(make_app(embedding_dim=5)) as client:
        body = (await client.post("/v1/embeddings", json={"input": "x"})).json()
    assert len(body["data"][0]["embedding"]) == 5


# --- errors ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "payload"),
    [
        (CHAT, b"{not json"),
        (CHAT, b"[1, 2]"),
        (CHAT, orjson.dumps({"model": "sim"})),
        (CHAT, orjson.dumps({"messages": []})),
        (CHAT, orjson.dumps({"messages": [{"content": "no role"}]})),
        (CHAT, orjson.dumps({"messages": HELLO, "max_tokens": 0})),
        (CHAT, orjson.dumps({"messages": HELLO, "max_tokens": "5"})),
        (CHAT, orjson.dumps({"messages": HELLO, "n": 1000})),
        (CHAT, orjson.dumps({"messages": HELLO, "stream_options": {"include_usage": True}})),
        ("/v1/completions", orjson.dumps({"prompt": []})),
        ("/v1/completions", orjson.dumps({"max_tokens": 3})),
        ("/v1/embeddings", orjson.dumps({"input": "x", "encoding_format": "int8"})),
        ("/v1/embeddings", orjson.dumps({"input": "x", "dimensions": 65})),
    ],
)
async def test_bad_input_is_400_in_vllm_shape(
    client: httpx.AsyncClient, path: str, payload: bytes
) -> None:
    response = await client.post(path, content=payload)
    assert_vllm_error(response, 400, "BadRequestError")


async def test_unknown_model_is_404(client: httpx.AsyncClient) -> None:
    response = await client.post(CHAT, json={"model": "gpt-9", "messages": HELLO})
    message = assert_vllm_error(response, 404, "NotFoundError")
    assert message == "The model `gpt-9` does not exist."


async def test_context_length_exceeded_is_400() -> None:
    async with client_for(make_app(max_model_len=20)) as client:
        # 13 prompt tokens + 8 > 20
        response = await client.post(CHAT, json={"messages": HELLO, "max_tokens": 8})
        message = assert_vllm_error(response, 400, "BadRequestError")
        assert "maximum context length is 20 tokens" in message
        assert "(13 in the messages, 8 in the completion)" in message
        ok = await client.post(CHAT, json={"messages": HELLO})
        assert ok.json()["usage"]["completion_tokens"] <= 7
        long_prompt = [{"role": "user", "content": "word " * 30}]
        too_long = await client.post(CHAT, json={"messages": long_prompt})
        assert "input tokens" in assert_vllm_error(too_long, 400, "BadRequestError")


async def test_api_key_is_required_on_v1_and_the_test_routes() -> None:
    async with client_for(make_app(api_key="s3cret")) as client:
        missing = await client.get("/v1/models")
        assert missing.status_code == 401
        assert missing.json() == {"error": "Unauthorized"}
        wrong = await client.post(
            CHAT, json={"messages": HELLO}, headers={"Authorization": "Bearer nope"}
        )
        assert wrong.status_code == 401
        good = await client.get("/v1/models", headers={"Authorization": "Bearer s3cret"})
        assert good.status_code == 200
        # The test routes show request bodies and reset counters: the key guards them too.
        assert (await client.get("/simulator/requests")).status_code == 401
        assert (await client.post("/simulator/reset")).status_code == 401
        stats = await client.get("/simulator/stats", headers={"Authorization": "Bearer s3cret"})
        assert stats.status_code == 200
        assert stats.json()["rejected_total"] == 4
        # Open, as in vLLM: the health check and Prometheus.
        assert (await client.get("/health")).status_code == 200
        assert (await client.get("/metrics")).status_code == 200


def test_the_api_key_comes_from_the_flag_then_simulator_api_key_then_vllm_api_key() -> None:
    assert config_from_args([], {}).api_key is None
    assert config_from_args([], {"VLLM_API_KEY": "from-vllm"}).api_key == "from-vllm"
    both = {"VLLM_API_KEY": "from-vllm", "SIMULATOR_API_KEY": "from-sim"}
    assert config_from_args([], both).api_key == "from-sim"
    assert config_from_args(["--api-key", "from-flag"], both).api_key == "from-flag"


# --- sleep contract ----------------------------------------------------------------------------


async def test_sleep_and_wake_up(client: httpx.AsyncClient) -> None:
    assert (await client.get("/is_sleeping")).json() == {"is_sleeping": False}
    assert (await client.post("/sleep", params={"level": "1"})).status_code == 200
    assert (await client.get("/is_sleeping")).json() == {"is_sleeping": True}
    refused = await client.post(CHAT, json={"messages": HELLO})
    assert_vllm_error(refused, 503, "ServiceUnavailableError")
    assert (await client.get("/simulator/stats")).json()["sleep_level"] == 1
    assert (await client.post("/wake_up")).status_code == 200
    assert (await client.get("/is_sleeping")).json() == {"is_sleeping": False}
    assert (await client.post(CHAT, json={"messages": HELLO})).status_code == 200
    assert (await client.post("/sleep?level=2")).status_code == 200
    assert (await client.get("/simulator/stats")).json()["sleep_level"] == 2
    assert (await client.post("/sleep?level=3")).status_code == 400


# --- metrics and stats -------------------------------------------------------------------------


def metric_value(text: str, series: str) -> float:
    """The value of one exact series line in a Prometheus exposition."""
    for line in text.splitlines():
        if line.startswith(series + " "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"series {series} not found")


async def test_metrics_expose_vllm_series_and_count_tokens(client: httpx.AsyncClient) -> None:
    await client.post(CHAT, json={"messages": HELLO, "max_tokens": 5})
    await client.post(CHAT, json={"messages": HELLO, "max_tokens": 3, "stream": True})
    response = await client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    text = response.text
    label = '{model_name="sim"}'
    for name in (
        "vllm:num_requests_running",
        "vllm:num_requests_waiting",
        "vllm:gpu_cache_usage_perc",
        "vllm:kv_cache_usage_perc",
    ):
        assert metric_value(text, name + label) == 0.0
    assert metric_value(text, "vllm:prompt_tokens_total" + label) == 26.0
    assert metric_value(text, "vllm:generation_tokens_total" + label) == 8.0
    success = 'vllm:request_success_total{finished_reason="length",model_name="sim"}'
    assert metric_value(text, success) == 2.0
    assert metric_value(text, "vllm:time_to_first_token_seconds_count" + label) == 2.0
    assert metric_value(text, "vllm:e2e_request_latency_seconds_count" + label) == 2.0


async def test_simulator_stats_and_reset(client: httpx.AsyncClient) -> None:
    await client.post(CHAT, json={"messages": HELLO, "max_tokens": 2})
    await client.post(CHAT, json={"model": "nope", "messages": HELLO})
    stats = (await client.get("/simulator/stats")).json()
    assert stats["simulator"] is True
    assert stats["served_model_names"] == ["sim", "sim-alias"]
    assert stats["requests_total"] == 2
    assert stats["completed_total"] == 1
    assert stats["rejected_total"] == 1
    assert stats["running"] == 0
    assert stats["aborted_total"] == 0
    assert stats["generation_tokens_total"] == 2
    reset = (await client.post("/simulator/reset")).json()
    assert reset["requests_total"] == 0
    assert reset["generation_tokens_total"] == 0


# --- fault injection that works in-process -----------------------------------------------------


async def test_error_after_chunks_header_sends_error_event(client: httpx.AsyncClient) -> None:
    response = await client.post(
        CHAT,
        json={"messages": HELLO, "max_tokens": 10, "stream": True},
        headers={"X-Simulator-Error-After-Chunks": "3"},
    )
    events = sse_events(response.text)
    assert events[-1] == "[DONE]"
    error = events[-2]["error"]
    assert error["object"] == "error"
    assert error["code"] == 500
    assert error["type"] == "InternalServerError"
    content = [e for e in events[1:-2] if e["choices"][0]["delta"].get("content")]
    assert len(content) == 3
    assert len(events) == 1 + 3 + 2
    stats = (await client.get("/simulator/stats")).json()
    assert stats["failed_total"] == 1
    assert stats["completed_total"] == 0


async def test_process_level_error_flag_and_non_stream_error() -> None:
    async with client_for(make_app(error_after_chunks=2)) as client:
        streamed = await client.post(
            "/v1/completions", json={"prompt": "x", "max_tokens": 5, "stream": True}
        )
        events = sse_events(streamed.text)
        assert [bool(e != "[DONE]" and "error" in e) for e in events] == [
            False,
            False,
            True,
            False,
        ]
        plain = await client.post("/v1/completions", json={"prompt": "x", "max_tokens": 5})
        assert_vllm_error(plain, 500, "InternalServerError")
        short = await client.post("/v1/completions", json={"prompt": "x", "max_tokens": 1})
        assert short.status_code == 200


async def test_forced_status_header(client: httpx.AsyncClient) -> None:
    response = await client.post(
        CHAT, json={"messages": HELLO}, headers={"X-Simulator-Status": "503"}
    )
    assert_vllm_error(response, 503, "ServiceUnavailableError")
    assert (await client.get("/simulator/stats")).json()["failed_total"] == 1


async def test_invalid_fault_header_is_400(client: httpx.AsyncClient) -> None:
    response = await client.post(
        CHAT, json={"messages": HELLO}, headers={"X-Simulator-Stall-After-Chunks": "soon"}
    )
    assert "x-simulator-stall-after-chunks" in assert_vllm_error(response, 400, "BadRequestError")


async def test_die_header_drops_a_non_streamed_response_mid_body(app: SimulatorApp) -> None:
    sent: list[dict[str, Any]] = []
    messages = [
        {
            "type": "http.request",
            "body": orjson.dumps({"messages": HELLO, "max_tokens": 5}),
            "more_body": False,
        }
    ]

    async def receive() -> dict[str, Any]:
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message: Any) -> None:
        sent.append(dict(message))

    scope = {
        "type": "http",
        "method": "POST",
        "path": CHAT,
        "query_string": b"",
        "headers": [(b"x-simulator-die-after-chunks", b"2")],
    }
    with pytest.raises(SimulatedConnectionDrop):
        await app(scope, receive, send)
    assert sent[0]["type"] == "http.response.start"
    declared = int(dict(sent[0]["headers"])[b"content-length"])
    assert len(sent[1]["body"]) < declared
    assert sent[1]["more_body"] is True
    assert app.stats.failed_total == 1
    assert app.stats.running == 0


# --- the test routes exist only with --test-routes ---------------------------------------------

CANARY = "canary-prompt-7f3e9a51 do not keep me"


def strings_held_by(root: object) -> list[str]:
    """Every string reachable from ``root`` through containers and instance attributes.

    Modules, classes, functions and code are not entered: they lead to every module (and to the
    canary in this file's own constants), not to what the simulator keeps for itself.
    """
    skip = (types.ModuleType, type, types.FunctionType, types.BuiltinFunctionType, types.CodeType)
    seen: set[int] = set()
    found: list[str] = []
    todo = [root]
    while todo:
        obj = todo.pop()
        if id(obj) in seen or isinstance(obj, skip):
            continue
        seen.add(id(obj))
        if isinstance(obj, str):
            found.append(obj)
        elif not isinstance(obj, (bytes, int, float)):
            todo.extend(gc.get_referents(obj))
    return found


async def _chat_with_the_canary(client: httpx.AsyncClient) -> list[bytes]:
    """A plain and a streamed chat carrying the canary; the raw bodies of the answers."""
    body = {"messages": [{"role": "user", "content": CANARY}], "max_tokens": 3}
    plain = await client.post(CHAT, content=orjson.dumps(body))
    assert plain.status_code == 200, plain.text
    streamed = await client.post(CHAT, content=orjson.dumps({**body, "stream": True}))
    assert streamed.status_code == 200, streamed.text
    return [plain.content, streamed.content]


async def test_without_test_routes_the_simulator_keeps_no_prompt_and_has_no_test_routes() -> None:
    app = make_app(test_routes=False)
    async with client_for(app) as client:
        answers = await _chat_with_the_canary(client)
        assert app.recent_requests is None
        assert not [text for text in strings_held_by(app) if CANARY in text]
        for method, path in (
            ("GET", "/simulator/requests"),
            ("GET", "/simulator/stats"),
            ("POST", "/simulator/reset"),
        ):
            response = await client.request(method, path)
            assert response.status_code == 404, (path, response.text)
            answers.append(response.content)
        answers.append((await client.get("/metrics")).content)
        assert not [body for body in answers if CANARY.encode() in body]
        # The fault headers are ignored: a forced status, an error event, even a bad value.
        for header, value in (
            ("X-Simulator-Status", "503"),
            ("X-Simulator-Error-After-Chunks", "1"),
            ("X-Simulator-Die-After-Chunks", "1"),
            ("X-Simulator-Stall-After-Chunks", "soon"),
        ):
            response = await client.post(
                CHAT,
                json={"messages": HELLO, "max_tokens": 4, "stream": True},
                headers={header: value},
            )
            assert response.status_code == 200, (header, response.text)
            events = sse_events(response.text)
            assert events[-1] == "[DONE]", header
            assert not [e for e in events[:-1] if "error" in e], header
        assert app.stats.failed_total == 0


async def test_with_test_routes_the_request_log_and_faults_work() -> None:
    app = make_app(test_routes=True)
    async with client_for(app) as client:
        await _chat_with_the_canary(client)
        # The same search finds the prompt where the flag says to keep it.
        assert [text for text in strings_held_by(app) if CANARY in text]
        recent = (await client.get("/simulator/requests")).json()
        assert [r["messages"][0]["content"] for r in recent["data"]] == [CANARY, CANARY]
        assert recent["paths"] == [CHAT, CHAT]
        forced = await client.post(
            CHAT, json={"messages": HELLO}, headers={"X-Simulator-Status": "503"}
        )
        assert forced.status_code == 503
        assert (await client.post("/simulator/reset")).status_code == 200
        assert (await client.get("/simulator/requests")).json() == {"data": [], "paths": []}
        assert not [text for text in strings_held_by(app) if CANARY in text]


def test_test_routes_come_only_from_the_command_line() -> None:
    assert config_from_args([], {}).test_routes is False
    # The gateway passes SIMULATOR_* on to its engines: the environment never turns them on.
    assert config_from_args([], {"SIMULATOR_TEST_ROUTES": "1"}).test_routes is False
    assert config_from_args(["--test-routes"], {}).test_routes is True
    assert "FOR TESTS ONLY" in build_parser({}).format_help()


# --- pieces ------------------------------------------------------------------------------------


def test_generated_text_counts_back_to_its_token_count() -> None:
    for seed in (0, 1, 12345, 2**32 - 1):
        ids = token_ids(seed, 40)
        assert count_tokens(render_text(ids)) == 40
    assert token_ids(7, 10) == token_ids(7, 10)
    assert token_ids(7, 10) != token_ids(8, 10)


def test_cli_flags_and_environment() -> None:
    help_text = build_parser({}).format_help()
    assert "SIMULATOR" in help_text
    assert "--die-after-chunks" in help_text
    config = config_from_args(
        ["--model", "m", "--served-model-name", "a", "b", "--stall-after-chunks", "4"],
        {"SIMULATOR_TOKENS_PER_SECOND": "25", "SIMULATOR_FAIL_AT_START": "1"},
    )
    assert config.model_names == ("a", "b")
    assert config.tokens_per_second == 25.0
    assert config.fail_at_start is True
    assert config.stall_after_chunks == 4
    assert config.die_after_chunks is None
    from_env = config_from_args([], {"SIMULATOR_SERVED_MODEL_NAME": "x,y", "SIMULATOR_PORT": "9"})
    assert from_env.model_names == ("x", "y")
    assert from_env.port == 9


def test_config_rejects_nonsense() -> None:
    with pytest.raises(ValueError, match="tokens_per_second"):
        SimulatorConfig(tokens_per_second=-1)
    with pytest.raises(ValueError, match="max_model_len"):
        SimulatorConfig(max_model_len=0)
