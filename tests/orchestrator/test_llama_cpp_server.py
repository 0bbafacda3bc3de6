"""The real llama.cpp engine (llama-cpp-python's OpenAI server, CPU build) on the tiny GGUF.

What the gateway can count on from it, and what it must not expect (checked here so that a new
llama-cpp-python release that changes them fails loudly): chat and text completions with usage;
streams ending in ``[DONE]`` that carry no usage, even when asked; embeddings only with
``--embedding``, one vector per token for a model without pooling; no /metrics, /slots or /health;
the request's ``model`` is echoed back unchecked.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.helpers.llama_cpp_engine import TINY_GGUF_NAME, LlamaCppEngine

MAX_TOKENS = 8


@pytest.fixture(scope="module")
def engine(llama_cpp_install: tuple[Path, Path]) -> Iterator[LlamaCppEngine]:
    python, gguf = llama_cpp_install
    with LlamaCppEngine(gguf, python=python) as started:
        yield started


@pytest.fixture
def client(engine: LlamaCppEngine) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=engine.base_url, timeout=60) as http:
        yield http


def _usage(body: dict[str, Any]) -> dict[str, int]:
    usage = body["usage"]
    assert all(isinstance(usage[k], int) for k in ("prompt_tokens", "completion_tokens"))
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert usage["prompt_tokens"] > 0
    return dict(usage)


def _chat(**extra: Any) -> dict[str, Any]:
    return {
        "model": TINY_GGUF_NAME,
        "messages": [{"role": "user", "content": "Hello! How are you today?"}],
        "max_tokens": MAX_TOKENS,
        **extra,
    }


def test_it_starts_fast_and_lists_the_alias(engine: LlamaCppEngine, client: httpx.Client) -> None:
    assert engine.started_in is not None
    assert engine.started_in < 30
    models = client.get("/models").json()
    assert [m["id"] for m in models["data"]] == [TINY_GGUF_NAME]


def test_chat_completion_with_usage(client: httpx.Client) -> None:
    reply = client.post("/chat/completions", json=_chat())
    assert reply.status_code == 200, reply.text
    body = reply.json()
    assert body["object"] == "chat.completion"
    assert body["model"] == TINY_GGUF_NAME
    (choice,) = body["choices"]
    assert choice["message"]["role"] == "assistant"
    assert isinstance(choice["message"]["content"], str)
    assert choice["finish_reason"] == "length"
    assert _usage(body)["completion_tokens"] == MAX_TOKENS


def test_a_chat_stream_ends_with_done_and_carries_no_usage(client: httpx.Client) -> None:
    events: list[str] = []
    body = _chat(stream=True, stream_options={"include_usage": True})
    with client.stream("POST", "/chat/completions", json=body) as reply:
        assert reply.status_code == 200
        assert reply.headers["content-type"].startswith("text/event-stream")
        events = [line.removeprefix("data: ") for line in reply.iter_lines() if line]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(event) for event in events[:-1]]
    assert all(chunk["object"] == "chat.completion.chunk" for chunk in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant"}
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    content = [c for c in chunks if c["choices"][0]["delta"].get("content") is not None]
    assert 0 < len(content) <= MAX_TOKENS
    # The gateway has to count a stream's tokens itself: include_usage is ignored.
    assert not any(chunk.get("usage") for chunk in chunks)


def test_text_completion_with_usage(client: httpx.Client) -> None:
    body = {"model": TINY_GGUF_NAME, "prompt": "Once upon a time", "max_tokens": MAX_TOKENS}
    reply = client.post("/completions", json=body)
    assert reply.status_code == 200, reply.text
    assert reply.json()["object"] == "text_completion"
    assert isinstance(reply.json()["choices"][0]["text"], str)
    assert _usage(reply.json())["completion_tokens"] == MAX_TOKENS


def test_the_model_name_is_not_checked(client: httpx.Client) -> None:
    reply = client.post("/chat/completions", json=_chat(model="some-other-model"))
    assert reply.status_code == 200
    assert reply.json()["model"] == "some-other-model"


def test_no_embeddings_without_the_flag(client: httpx.Client) -> None:
    reply = client.post("/embeddings", json={"model": TINY_GGUF_NAME, "input": "hello"})
    assert reply.status_code == 500
    assert "embedding=True" in reply.json()["error"]["message"]


@pytest.mark.parametrize("path", ["/metrics", "/slots", "/health", "/props"])
def test_llama_server_routes_are_absent(engine: LlamaCppEngine, path: str) -> None:
    # llama.cpp's own llama-server has these; llama-cpp-python's server does not.
    assert httpx.get(engine.root_url + path, timeout=10).status_code == 404


def test_embeddings_with_the_flag_are_per_token(llama_cpp_install: tuple[Path, Path]) -> None:
    python, gguf = llama_cpp_install
    with LlamaCppEngine(gguf, python=python, extra_args=["--embedding", "true"]) as engine:
        reply = httpx.post(
            f"{engine.base_url}/embeddings",
            json={"model": TINY_GGUF_NAME, "input": ["hello world", "a"]},
            timeout=60,
        )
    assert reply.status_code == 200, reply.text
    body = reply.json()
    tokens = [len(item["embedding"]) for item in body["data"]]
    # No pooling in a Llama GGUF: a list of 128-float vectors per input, one per token, not
    # OpenAI's single vector per input.
    assert all(len(vector) == 128 for item in body["data"] for vector in item["embedding"])
    assert body["usage"]["prompt_tokens"] == sum(tokens)
