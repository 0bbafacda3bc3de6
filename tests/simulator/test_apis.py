"""The simulator's other vLLM APIs: chat tool calls, tokenize, scoring, transcriptions, and
``--without-api`` (an engine that does not serve some of them)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import anthropic
import httpx
import openai
import orjson
import pytest
from openai.types.chat import ChatCompletion, ChatCompletionMessageParam, ChatCompletionToolParam

from simulator import SimulatorApp, SimulatorConfig, create_simulator_app
from simulator.__main__ import config_from_args
from simulator.config import OPTIONAL_APIS
from simulator.text import count_tokens
from simulator.tokenizer import token_text
from tests.helpers.proxy import simulator_process

CHAT = "/v1/chat/completions"
HELLO = [{"role": "user", "content": "Say hello to the simulator please"}]
SDK_HELLO: list[ChatCompletionMessageParam] = [
    {"role": "user", "content": "Say hello to the simulator please"}
]
LOOKUP: ChatCompletionToolParam = {
    "type": "function",
    "function": {
        "name": "lookup",
        "description": "Look a word up",
        "parameters": {
            "type": "object",
            "properties": {"word": {"type": "string"}, "limit": {"type": "integer"}},
            "required": ["word", "limit"],
        },
    },
}
NAMED = {"type": "function", "function": {"name": "lookup"}}


def make_app(**overrides: Any) -> SimulatorApp:
    """A simulator serving ``sim`` with its test routes."""
    settings: dict[str, Any] = {"model": "sim-model", "served_model_names": ("sim",)}
    settings["test_routes"] = True
    settings.update(overrides)
    return create_simulator_app(SimulatorConfig(**settings))


def client_for(app: SimulatorApp) -> httpx.AsyncClient:
    """An httpx client talking to ``app`` in-process."""
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://sim")


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    """A client talking to a fresh simulator in-process."""
    async with client_for(make_app()) as c:
        yield c


def data_events(body: str) -> list[Any]:
    """The ``data:`` payloads of an SSE body, ``[DONE]`` as a string."""
    out = []
    for line in body.split("\n"):
        if line.startswith("data: "):
            payload = line[len("data: ") :]
            out.append(payload if payload == "[DONE]" else orjson.loads(payload))
    return out


# --- chat tool calls ----------------------------------------------------------------------------


async def test_required_tool_choice_calls_the_tool(client: httpx.AsyncClient) -> None:
    body = {"messages": HELLO, "tools": [LOOKUP], "tool_choice": "required"}
    reply = ChatCompletion.model_validate((await client.post(CHAT, json=body)).json())
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content == ""
    [call] = choice.message.tool_calls or []
    assert call.type == "function"
    assert call.id.startswith("chatcmpl-tool-")
    assert call.function.name == "lookup"
    assert json.loads(call.function.arguments) == {"word": "simulated", "limit": 1}
    assert reply.usage is not None
    assert reply.usage.completion_tokens == count_tokens(call.function.arguments)
    # Named: vLLM reports "stop"; no tool_choice ("auto"): a text reply.
    named = (await client.post(CHAT, json={**body, "tool_choice": NAMED})).json()
    assert named["choices"][0]["finish_reason"] == "stop"
    assert named["choices"][0]["message"]["tool_calls"][0]["function"]["name"] == "lookup"
    auto = (await client.post(CHAT, json={"messages": HELLO, "tools": [LOOKUP]})).json()
    assert auto["choices"][0]["message"]["tool_calls"] == []
    assert auto["choices"][0]["message"]["content"]
    # The tool definitions are part of the prompt.
    plain = (await client.post(CHAT, json={"messages": HELLO})).json()
    assert auto["usage"]["prompt_tokens"] > plain["usage"]["prompt_tokens"]


async def test_streamed_tool_call_and_round_trip() -> None:
    app = make_app()
    http = client_for(app)
    async with openai.AsyncOpenAI(api_key="x", base_url="http://sim/v1", http_client=http) as sdk:
        stream = await sdk.chat.completions.create(
            model="sim", messages=SDK_HELLO, tools=[LOOKUP], tool_choice="required", stream=True
        )
        arguments = ""
        name = call_id = None
        finish = None
        deltas = 0
        async for chunk in stream:
            choice = chunk.choices[0]
            for call in choice.delta.tool_calls or []:
                deltas += 1
                name = name or (call.function.name if call.function else None)
                call_id = call_id or call.id
                arguments += (call.function.arguments or "") if call.function else ""
            finish = choice.finish_reason or finish
        assert (name, finish) == ("lookup", "tool_calls")
        assert json.loads(arguments) == {"word": "simulated", "limit": 1}
        assert deltas == count_tokens(arguments) > 1
        round_trip: list[ChatCompletionMessageParam] = [
            *SDK_HELLO,
            {
                "role": "assistant",
                "tool_calls": [
                    {
                        "id": call_id or "",
                        "type": "function",
                        "function": {"name": "lookup", "arguments": arguments},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": call_id or "", "content": "a definition"},
        ]
        answer = await sdk.chat.completions.create(
            model="sim", tools=[LOOKUP], tool_choice="required", messages=round_trip
        )
    assert answer.choices[0].message.tool_calls == []
    assert answer.choices[0].message.content
    assert answer.choices[0].finish_reason in ("stop", "length")


async def test_tool_choice_errors_are_vllms(client: httpx.AsyncClient) -> None:
    cases: list[tuple[dict[str, Any], str]] = [
        ({"tool_choice": "required"}, "When using `tool_choice`, `tools` must be set."),
        ({"tools": [], "tool_choice": "auto"}, "`tools` must not be an empty array."),
        (
            {"tools": [LOOKUP], "tool_choice": {"type": "function", "function": {"name": "x"}}},
            "The tool specified in `tool_choice` does not match any of the specified `tools`",
        ),
    ]
    for extra, message in cases:
        reply = await client.post(CHAT, json={"messages": HELLO, **extra})
        assert reply.status_code == 400
        assert reply.json()["message"].startswith(message)


# --- tokenize -----------------------------------------------------------------------------------


async def test_tokenize_round_trips_and_counts_like_chat(client: httpx.AsyncClient) -> None:
    prompt = "the simulated engine tokenizes naïve déjà-vu words like supercalifragilistic"
    tokens = (await client.post("/tokenize", json={"prompt": prompt})).json()
    assert tokens["count"] == len(tokens["tokens"]) == count_tokens(prompt)
    assert tokens["max_model_len"] == 4096
    assert tokens["token_strs"] is None
    assert tokens["tokens"][:3] == [0, 1, 2]  # vocabulary words keep their generation ids
    back = (await client.post("/detokenize", json={"tokens": tokens["tokens"]})).json()
    assert back == {"prompt": prompt}
    messages = [{"role": "system", "content": "Be short"}, *HELLO]
    chat = (await client.post(CHAT, json={"messages": messages})).json()
    rendered = (
        await client.post("/tokenize", json={"messages": messages, "return_token_strs": True})
    ).json()
    assert rendered["count"] == chat["usage"]["prompt_tokens"]
    assert rendered["token_strs"][:3] == ["<|im_start|>", "system", "<|sep|>"]
    # A reply tokenizes to the ids that generated it.
    reply = chat["choices"][0]["message"]["content"]
    ids = (await client.post("/tokenize", json={"prompt": reply})).json()["tokens"]
    assert all(i < 64 for i in ids)
    assert " ".join(token_text(i) for i in ids) == reply


async def test_detokenize_refuses_unknown_ids(client: httpx.AsyncClient) -> None:
    reply = await client.post("/detokenize", json={"tokens": [100]})
    assert reply.status_code == 400
    assert reply.json()["message"] == "Token id 100 is out of vocabulary"
    assert (await client.post("/detokenize", json={"tokens": [-1]})).status_code == 400
    assert (
        await client.post("/tokenize", json={"model": "nope", "prompt": "x"})
    ).status_code == 404


# --- scoring ------------------------------------------------------------------------------------


async def test_rerank_orders_by_word_overlap(client: httpx.AsyncClient) -> None:
    documents = ["nothing shared here", "the quick brown fox", "a quick fox"]
    for path in ("/rerank", "/v1/rerank", "/v2/rerank"):
        reply = await client.post(
            path, json={"model": "sim", "query": "quick brown fox", "documents": documents}
        )
        assert reply.status_code == 200, path
        body = reply.json()
        assert body["id"].startswith("score-")
        assert body["model"] == "sim"
        assert [r["index"] for r in body["results"]] == [1, 2, 0]
        assert body["results"][0]["document"] == {"text": documents[1], "multi_modal": None}
        scores = [r["relevance_score"] for r in body["results"]]
        assert scores == sorted(scores, reverse=True)
        assert scores[-1] == 0.0
        assert body["usage"] == {"prompt_tokens": 3 * 3 + 3 + 4 + 3, "total_tokens": 19}
    top = await client.post(
        "/rerank", json={"query": "quick brown fox", "documents": documents, "top_n": 1}
    )
    assert [r["index"] for r in top.json()["results"]] == [1]


async def test_score_pairs_like_vllm(client: httpx.AsyncClient) -> None:
    reply = await client.post(
        "/score", json={"model": "sim", "queries": "red apple", "documents": ["red apple", "blue"]}
    )
    body = reply.json()
    assert body["object"] == "list"
    assert [d["score"] for d in body["data"]] == [1.0, 0.0]
    assert [d["object"] for d in body["data"]] == ["score", "score"]
    assert body["usage"]["prompt_tokens"] == 4 + 3
    zipped = await client.post("/v1/score", json={"text_1": ["a b", "c"], "text_2": ["a", "c"]})
    assert [d["score"] for d in zipped.json()["data"]] == [0.5, 1.0]
    bad = await client.post("/score", json={"text_1": ["a", "b"], "text_2": ["a", "b", "c"]})
    assert bad.status_code == 400
    assert bad.json()["message"] == "Input lengths must be either 1:1, 1:N or N:N"


# --- transcriptions -----------------------------------------------------------------------------


async def test_transcription_from_a_multipart_upload(client: httpx.AsyncClient) -> None:
    audio = b"\0" * 96_000  # three seconds at 16 kHz, 16 bit
    files = {"file": ("clip.wav", audio, "audio/wav")}
    reply = await client.post(
        "/v1/audio/transcriptions", files=files, data={"model": "sim", "language": "en"}
    )
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert body["usage"] == {"type": "duration", "seconds": 3}
    assert count_tokens(body["text"]) == 8  # 2.5 words a second
    again = await client.post("/v1/audio/transcriptions", files=files, data={"model": "sim"})
    assert again.json() == body
    longer = await client.post(
        "/v1/audio/transcriptions", files={"file": ("b.wav", audio * 2, "audio/wav")}
    )
    assert longer.json()["text"] != body["text"]
    sdk_http = client_for(make_app())
    async with openai.AsyncOpenAI(
        api_key="x", base_url="http://sim/v1", http_client=sdk_http
    ) as sdk:
        text = await sdk.audio.transcriptions.create(model="sim", file=("clip.wav", audio))
    assert text.text == body["text"]
    recent = (await client.get("/simulator/requests")).json()
    assert recent["paths"][0] == "/v1/audio/transcriptions"
    assert recent["data"][0] == {
        "model": "sim",
        "language": "en",
        "file": {"filename": "clip.wav", "bytes": len(audio)},
    }


async def test_transcription_errors(client: httpx.AsyncClient) -> None:
    no_file = await client.post("/v1/audio/transcriptions", data={"model": "sim"})
    assert no_file.status_code == 400
    assert no_file.json()["message"].startswith("file: Field required")
    as_json = await client.post("/v1/audio/transcriptions", json={"model": "sim"})
    assert as_json.status_code == 400
    files = {"file": ("a.wav", b"\0" * 10, "audio/wav")}
    srt = await client.post(
        "/v1/audio/transcriptions", files=files, data={"response_format": "srt"}
    )
    assert srt.status_code == 400
    assert "response_format" in srt.json()["message"]


# --- --without-api ------------------------------------------------------------------------------


async def test_without_api_routes_answer_404_like_a_missing_route() -> None:
    app = make_app(without_apis=frozenset({"messages", "responses", "tokenize", "rerank"}))
    async with client_for(app) as client:
        for path in (
            "/v1/messages",
            "/v1/messages/count_tokens",
            "/v1/responses",
            "/v1/responses/resp_1",
            "/tokenize",
            "/detokenize",
            "/rerank",
            "/v1/rerank",
            "/v2/rerank",
        ):
            reply = await client.post(path, json={})
            assert reply.status_code == 404, path
            assert reply.json() == {"detail": "Not Found"}, path
        # What it still serves.
        assert (await client.post("/score", json={"text_1": "a", "text_2": "a"})).status_code == 200
        assert (await client.post(CHAT, json={"messages": HELLO})).status_code == 200


def test_without_api_from_flags_and_environment() -> None:
    config = config_from_args(["--without-api", "messages", "--without-api", "score"], env={})
    assert config.without_apis == {"messages", "score"}
    from_env = config_from_args([], env={"SIMULATOR_WITHOUT_API": "tokenize,transcriptions"})
    assert from_env.without_apis == {"tokenize", "transcriptions"}
    assert config_from_args([], env={}).without_apis == frozenset()
    with pytest.raises(SystemExit):
        config_from_args(["--without-api", "nonsense"], env={})
    with pytest.raises(ValueError, match="unknown API"):
        SimulatorConfig(without_apis=frozenset({"nonsense"}))
    assert set(OPTIONAL_APIS) >= {"messages", "responses", "tokenize", "rerank", "score"}


async def test_a_real_process_serves_messages_and_refuses_what_it_lacks() -> None:
    async with (
        simulator_process("--model", "sim", "--without-api", "responses") as url,
        httpx.AsyncClient(base_url=url) as http,
    ):
        assert (await http.post("/v1/responses", json={"input": "x"})).status_code == 404
        async with anthropic.AsyncAnthropic(api_key="x", base_url=url) as sdk:
            message = await sdk.messages.create(
                model="sim", max_tokens=5, messages=[{"role": "user", "content": "hello"}]
            )
        assert message.stop_reason == "max_tokens"
        assert message.usage.output_tokens == 5
        stats = (await http.get("/simulator/stats")).json()
        assert stats["requests_by_path"] == {"/v1/messages": 1}
        assert stats["completed_total"] == 1
