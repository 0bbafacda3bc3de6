"""The official openai SDK (sync and async) against the gateway, simulator engine behind it."""

from __future__ import annotations

import asyncio
import base64
import struct
from collections.abc import AsyncIterator
from typing import Any

import openai
import pytest

from tests.helpers.proxy import HELLO, Gateway, gateway, gateway_settings, sim_profile

IGNORE_EOS = {"ignore_eos": True}
EMBEDDING_DIM = 64


@pytest.fixture(scope="module")
async def gw() -> AsyncIterator[Gateway]:
    profiles = {
        "sim-a": sim_profile("sim-a", aliases=("model-a",)),
        "sim-b": sim_profile("sim-b"),
    }
    async with gateway(gateway_settings(profiles, "sim-a")) as served:
        yield served


def _content_deltas(chunks: list[Any]) -> list[str]:
    return [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]


# -- chat --------------------------------------------------------------------------------------


async def test_chat_async(gw: Gateway) -> None:
    async with gw.sdk() as sdk:
        completion = await sdk.chat.completions.create(
            model="sim-a", messages=HELLO, max_tokens=7, extra_body=IGNORE_EOS
        )
    assert completion.object == "chat.completion"
    assert completion.model == "sim-a"
    assert completion.choices[0].message.role == "assistant"
    assert completion.choices[0].message.content
    assert completion.choices[0].finish_reason == "length"
    assert completion.usage is not None
    assert completion.usage.completion_tokens == 7
    assert completion.usage.prompt_tokens > 0
    assert completion.usage.total_tokens == completion.usage.prompt_tokens + 7


async def test_chat_sync_in_a_thread(gw: Gateway) -> None:
    def call() -> Any:
        with gw.sync_sdk() as sdk:
            return sdk.chat.completions.create(
                model="sim-a", messages=HELLO, max_tokens=5, extra_body=IGNORE_EOS
            )

    completion = await asyncio.to_thread(call)
    assert completion.model == "sim-a"
    assert completion.choices[0].message.content
    assert completion.usage.completion_tokens == 5


async def test_stream_async_has_no_usage_chunk_unless_asked(gw: Gateway) -> None:
    async with gw.sdk() as sdk:
        stream = await sdk.chat.completions.create(
            model="sim-a", messages=HELLO, max_tokens=6, stream=True, extra_body=IGNORE_EOS
        )
        chunks = [chunk async for chunk in stream]
    assert all(chunk.object == "chat.completion.chunk" for chunk in chunks)
    assert all(chunk.model == "sim-a" for chunk in chunks)
    assert len(_content_deltas(chunks)) == 6
    # The gateway asks the engine for usage (to count tokens) but hides that extra chunk.
    assert all(chunk.usage is None for chunk in chunks)
    assert all(chunk.choices for chunk in chunks)
    assert chunks[-1].choices[0].finish_reason == "length"


async def test_stream_async_with_include_usage(gw: Gateway) -> None:
    async with gw.sdk() as sdk:
        stream = await sdk.chat.completions.create(
            model="sim-a",
            messages=HELLO,
            max_tokens=9,
            stream=True,
            stream_options={"include_usage": True},
            extra_body=IGNORE_EOS,
        )
        chunks = [chunk async for chunk in stream]
    with_usage = [chunk for chunk in chunks if chunk.usage is not None]
    assert len(with_usage) == 1
    assert with_usage[0] is chunks[-1]
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 9
    assert chunks[-1].usage.prompt_tokens > 0
    assert len(_content_deltas(chunks)) == 9


async def test_stream_sync_in_a_thread(gw: Gateway) -> None:
    def call(include_usage: bool) -> list[Any]:
        options: Any = {"include_usage": True} if include_usage else openai.omit
        with gw.sync_sdk() as sdk:
            stream = sdk.chat.completions.create(
                model="sim-a",
                messages=HELLO,
                max_tokens=4,
                stream=True,
                stream_options=options,
                extra_body=IGNORE_EOS,
            )
            return list(stream)

    plain, counted = await asyncio.gather(
        asyncio.to_thread(call, False), asyncio.to_thread(call, True)
    )
    assert len(_content_deltas(plain)) == 4
    assert [chunk.usage for chunk in plain if chunk.usage is not None] == []
    usage = [chunk.usage for chunk in counted if chunk.usage is not None]
    assert len(usage) == 1
    assert usage[0].completion_tokens == 4
    assert len(_content_deltas(counted)) == 4


# -- completions and embeddings ------------------------------------------------------------------


async def test_completions(gw: Gateway) -> None:
    async with gw.sdk() as sdk:
        completion = await sdk.completions.create(
            model="sim-a", prompt="Once upon a time", max_tokens=5, extra_body=IGNORE_EOS
        )
        stream = await sdk.completions.create(
            model="sim-a",
            prompt="Once upon a time",
            max_tokens=3,
            stream=True,
            stream_options={"include_usage": True},
            extra_body=IGNORE_EOS,
        )
        chunks = [chunk async for chunk in stream]
    assert completion.object == "text_completion"
    assert completion.model == "sim-a"
    assert completion.choices[0].text
    assert completion.usage is not None
    assert completion.usage.completion_tokens == 5
    texts = [c.choices[0].text for c in chunks if c.choices and c.choices[0].text]
    assert len(texts) == 3
    assert [c.usage.completion_tokens for c in chunks if c.usage is not None] == [3]


async def test_completions_sync_in_a_thread(gw: Gateway) -> None:
    def call() -> Any:
        with gw.sync_sdk() as sdk:
            return sdk.completions.create(
                model="sim-a", prompt=["one", "two"], max_tokens=2, extra_body=IGNORE_EOS
            )

    completion = await asyncio.to_thread(call)
    assert sorted(choice.index for choice in completion.choices) == [0, 1]
    assert completion.usage.completion_tokens == 4


async def test_embeddings(gw: Gateway) -> None:
    async with gw.sdk() as sdk:
        # The SDK asks for base64 by default and decodes it; float is asked for explicitly.
        decoded = await sdk.embeddings.create(model="sim-a", input=["alpha", "beta gamma"])
        floats = await sdk.embeddings.create(model="sim-a", input="alpha", encoding_format="float")
    assert decoded.model == "sim-a"
    assert [item.index for item in decoded.data] == [0, 1]
    assert all(len(item.embedding) == EMBEDDING_DIM for item in decoded.data)
    assert decoded.usage.prompt_tokens > 0
    assert floats.data[0].embedding == pytest.approx(decoded.data[0].embedding, abs=1e-6)


async def test_embeddings_sync_in_a_thread(gw: Gateway) -> None:
    def call() -> Any:
        with gw.sync_sdk() as sdk:
            return sdk.embeddings.with_raw_response.create(
                model="model-a", input="alpha", encoding_format="base64"
            )

    raw = await asyncio.to_thread(call)
    assert raw.headers["x-gateway-route"] == "local"
    vector = base64.b64decode(raw.http_response.json()["data"][0]["embedding"])
    assert len(struct.unpack(f"<{EMBEDDING_DIM}f", vector)) == EMBEDDING_DIM


# -- models and the active model -----------------------------------------------------------------


async def test_models_list_every_profile_with_its_state(gw: Gateway) -> None:
    async with gw.sdk() as sdk:
        page = await sdk.models.list()
    by_id = {model.id: model.model_dump() for model in page.data}
    assert set(by_id) == {"sim-a", "sim-b"}
    assert by_id["sim-a"]["state"] == "ready"
    assert by_id["sim-a"]["aliases"] == ["model-a"]
    assert by_id["sim-a"]["profile"] == "sim-a"
    assert by_id["sim-b"]["state"] == "not_loaded"
    assert all(entry["object"] == "model" for entry in by_id.values())


async def test_sync_models_list(gw: Gateway) -> None:
    def call() -> list[str]:
        with gw.sync_sdk() as sdk:
            return [model.id for model in sdk.models.list()]

    assert {"sim-a", "sim-b"} <= set(await asyncio.to_thread(call))


async def test_current_or_absent_model_is_the_active_model(gw: Gateway) -> None:
    async with gw.sdk() as sdk:
        current = await sdk.chat.completions.create(model="current", messages=HELLO, max_tokens=2)
        # The SDK's types require a model; sent without one, the gateway uses the active one.
        absent = await sdk.chat.completions.create(  # type: ignore[call-overload]
            model=openai.omit,
            messages=HELLO,
            max_tokens=2,
        )
        alias = await sdk.completions.create(model="model-a", prompt="hi", max_tokens=2)
        stream = await sdk.chat.completions.create(
            model="current", messages=HELLO, max_tokens=2, stream=True
        )
        streamed = {chunk.model async for chunk in stream}
    assert current.model == "sim-a"
    assert absent.model == "sim-a"
    # An alias reaches the engine serving it under that name.
    assert alias.model == "model-a"
    assert streamed == {"sim-a"}


async def test_model_absent_raw_body(gw: Gateway) -> None:
    response = await gw.http.post("/v1/chat/completions", json={"messages": HELLO, "max_tokens": 2})
    assert response.status_code == 200, response.text
    assert response.json()["model"] == "sim-a"
    assert response.headers["x-gateway-route"] == "local"
