"""The official openai SDK against the gateway with real vLLM (CPU build, tiny random Llama).

One gateway for the module: vLLM takes ~20 s to start, paid once. The model's text is noise, so
the assertions are on shapes, token counts and usage, never on content.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anthropic
import httpx
import openai
import pytest
import yaml

from tests.helpers.paths import REPO
from tests.helpers.proxy import HELLO, Gateway, gateway, gateway_settings

pytestmark = pytest.mark.vllm

MODEL = "tiny-llama"
IGNORE_EOS = {"ignore_eos": True}


@pytest.fixture(scope="module")
async def gw(vllm_install: tuple[Path, Path]) -> AsyncIterator[Gateway]:
    vllm_python, model_dir = vllm_install
    # The shipped profiles, with tiny-cpu pointed at this machine's tiny model.
    profiles = yaml.safe_load((REPO / "model_profiles.yml").read_text())["profiles"]
    profiles["tiny-cpu"]["model"] = str(model_dir)
    settings = gateway_settings(profiles, "tiny-cpu", VLLM_PYTHON=str(vllm_python))
    async with gateway(settings, wait=False) as served:
        await served.wait_ready("tiny-cpu", timeout_s=300)
        yield served


async def test_chat(gw: Gateway) -> None:
    async with gw.sdk(timeout=60) as sdk:
        named = await sdk.chat.completions.create(
            model=MODEL, messages=HELLO, max_tokens=6, extra_body=IGNORE_EOS
        )
        current = await sdk.chat.completions.create(
            model="current", messages=HELLO, max_tokens=3, extra_body=IGNORE_EOS
        )
    assert named.object == "chat.completion"
    assert named.model == MODEL
    assert isinstance(named.choices[0].message.content, str)
    assert named.choices[0].finish_reason == "length"
    assert named.usage is not None
    assert named.usage.completion_tokens == 6
    assert named.usage.prompt_tokens > 0
    assert current.model == MODEL
    assert current.usage is not None
    assert current.usage.completion_tokens == 3


async def test_chat_sync_in_a_thread(gw: Gateway) -> None:
    def call() -> Any:
        with gw.sync_sdk(timeout=60) as sdk:
            return sdk.chat.completions.create(
                model=MODEL, messages=HELLO, max_tokens=4, extra_body=IGNORE_EOS
            )

    completion = await asyncio.to_thread(call)
    assert completion.model == MODEL
    assert completion.usage.completion_tokens == 4


async def test_stream_with_and_without_include_usage(gw: Gateway) -> None:
    async with gw.sdk(timeout=60) as sdk:
        counted = await sdk.chat.completions.create(
            model=MODEL,
            messages=HELLO,
            max_tokens=8,
            stream=True,
            stream_options={"include_usage": True},
            extra_body=IGNORE_EOS,
        )
        counted_chunks = [chunk async for chunk in counted]
        plain = await sdk.chat.completions.create(
            model=MODEL, messages=HELLO, max_tokens=5, stream=True, extra_body=IGNORE_EOS
        )
        plain_chunks = [chunk async for chunk in plain]
    usage = [chunk for chunk in counted_chunks if chunk.usage is not None]
    assert len(usage) == 1
    assert usage[0] is counted_chunks[-1]
    assert counted_chunks[-1].choices == []
    assert usage[0].usage is not None
    assert usage[0].usage.completion_tokens == 8
    assert all(chunk.model == MODEL for chunk in counted_chunks)
    finishes = [c.choices[0].finish_reason for c in counted_chunks if c.choices]
    assert finishes[-1] == "length"
    # Without include_usage the gateway hides the usage chunk it asked vLLM for.
    assert [chunk for chunk in plain_chunks if chunk.usage is not None] == []
    assert all(chunk.choices for chunk in plain_chunks)
    assert [c.choices[0].finish_reason for c in plain_chunks][-1] == "length"


async def test_completions(gw: Gateway) -> None:
    async with gw.sdk(timeout=60) as sdk:
        completion = await sdk.completions.create(
            model=MODEL, prompt="Once upon a time", max_tokens=5, extra_body=IGNORE_EOS
        )
        stream = await sdk.completions.create(
            model=MODEL,
            prompt="Once upon a time",
            max_tokens=4,
            stream=True,
            stream_options={"include_usage": True},
            extra_body=IGNORE_EOS,
        )
        chunks = [chunk async for chunk in stream]
    assert completion.object == "text_completion"
    assert completion.model == MODEL
    assert isinstance(completion.choices[0].text, str)
    assert completion.usage is not None
    assert completion.usage.completion_tokens == 5
    assert [c.usage.completion_tokens for c in chunks if c.usage is not None] == [4]


async def test_models_list(gw: Gateway) -> None:
    async with gw.sdk() as sdk:
        page = await sdk.models.list()
    by_id = {model.id: model.model_dump() for model in page.data}
    assert by_id[MODEL]["state"] == "ready"
    assert by_id[MODEL]["profile"] == "tiny-cpu"
    assert by_id["simulator"]["state"] == "not_loaded"


async def test_embeddings_error_is_passed_through(gw: Gateway) -> None:
    # A generative model serves no embeddings: vLLM's own answer reaches the client unchanged.
    engine_url = await gw.wait_ready("tiny-cpu")
    body = {"model": MODEL, "input": "hello"}
    async with httpx.AsyncClient(timeout=60, headers=gw.engine_headers()) as direct:
        expected = await direct.post(f"{engine_url}/v1/embeddings", json=body)
    relayed = await gw.http.post("/v1/embeddings", json=body, timeout=60)
    async with gw.sdk(timeout=60) as sdk:
        with pytest.raises(openai.APIStatusError) as raised:
            await sdk.embeddings.create(model=MODEL, input="hello")
    assert expected.status_code >= 400
    assert relayed.status_code == expected.status_code
    assert relayed.json() == expected.json()
    assert relayed.headers["x-error-source"] == "upstream"
    assert relayed.headers["x-gateway-route"] == "local"
    assert raised.value.status_code == expected.status_code
    assert raised.value.response.headers["x-error-source"] == "upstream"


# -- the routes beyond chat, passed through to vLLM itself --------------------------------------


async def test_responses(gw: Gateway) -> None:
    async with gw.sdk(timeout=60) as sdk:
        whole = await sdk.responses.create(
            model=MODEL, input="hello there", max_output_tokens=5, extra_body=IGNORE_EOS
        )
        stream = await sdk.responses.create(
            model=MODEL, input="hello", max_output_tokens=4, stream=True, extra_body=IGNORE_EOS
        )
        events = [event async for event in stream]
    assert whole.object == "response"
    assert whole.usage is not None
    assert whole.usage.output_tokens == 5
    assert whole.usage.input_tokens > 0
    assert events[0].type == "response.created"
    final = events[-1]
    assert final.type in ("response.completed", "response.incomplete")
    assert final.response.usage is not None
    assert final.response.usage.output_tokens == 4


async def test_anthropic_messages(gw: Gateway) -> None:
    hello: list[anthropic.types.MessageParam] = [{"role": "user", "content": "hello there"}]
    async with anthropic.AsyncAnthropic(
        base_url=gw.url, api_key="unused", max_retries=0, timeout=60
    ) as sdk:
        message = await sdk.messages.create(model=MODEL, max_tokens=5, messages=hello)
        async with sdk.messages.stream(model=MODEL, max_tokens=4, messages=hello) as stream:
            final = await stream.get_final_message()
        counted = await sdk.messages.count_tokens(model=MODEL, messages=hello)
    # vLLM's Anthropic route has no ignore_eos: the random model may end early.
    assert message.type == "message"
    assert 0 < message.usage.output_tokens <= 5
    assert message.usage.input_tokens > 0
    assert message.stop_reason in ("max_tokens", "end_turn")
    assert 0 < final.usage.output_tokens <= 4
    assert final.stop_reason in ("max_tokens", "end_turn")
    assert counted.input_tokens > 0


async def test_tokenize_round_trip(gw: Gateway) -> None:
    tokens = await gw.http.post("/tokenize", json={"model": MODEL, "prompt": "hello world"})
    assert tokens.status_code == 200, tokens.text
    ids = tokens.json()["tokens"]
    assert tokens.json()["count"] == len(ids) > 0
    text = await gw.http.post("/detokenize", json={"model": MODEL, "tokens": ids})
    assert text.status_code == 200, text.text
    assert "hello world" in text.json()["prompt"]


async def test_rerank_on_a_generative_model_is_vllms_own_error(gw: Gateway) -> None:
    response = await gw.http.post(
        "/v1/rerank", json={"model": MODEL, "query": "q", "documents": ["d"]}, timeout=60
    )
    assert response.status_code >= 400
    assert response.headers["x-error-source"] == "upstream"
