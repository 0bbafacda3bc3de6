"""A GGUF model on a real llama.cpp server (llama-cpp-python's, built by the test command) through
the gateway: loaded from its profile, chat stream and not, Anthropic's messages translated,
switching with the real vLLM tiny-cpu engine and back, and the engine killed mid-stream.

The tiny GGUF is the tiny random Llama the vLLM tests use, converted (scripts/make_tiny_gguf.py):
its text is noise, so the assertions are on shapes, counts and states.
"""

from __future__ import annotations

import os
import signal
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anthropic
import orjson
import pytest
import yaml

from tests.helpers.paths import REPO
from tests.helpers.polling import eventually
from tests.helpers.proxy import AUTH, HELLO, Gateway, gateway, gateway_settings

pytestmark = pytest.mark.vllm

GGUF = "tiny-gguf"


def _profiles(gguf: Path, model_dir: Path) -> dict[str, Any]:
    shipped = yaml.safe_load((REPO / "model_profiles.yml").read_text())["profiles"]
    profiles = {"tiny-gguf": shipped["tiny-gguf"], "tiny-cpu": shipped["tiny-cpu"]}
    profiles["tiny-gguf"]["model"] = str(gguf)
    profiles["tiny-cpu"]["model"] = str(model_dir)
    return dict(profiles)


@pytest.fixture(scope="module")
async def gw(
    llama_cpp_install: tuple[Path, Path], vllm_install: tuple[Path, Path]
) -> AsyncIterator[Gateway]:
    llama_python, gguf = llama_cpp_install
    vllm_python, model_dir = vllm_install
    settings = gateway_settings(
        _profiles(gguf, model_dir),
        "tiny-gguf",
        LLAMA_CPP_PYTHON=str(llama_python),
        VLLM_PYTHON=str(vllm_python),
        FLEET_MAX_ENGINES=1,
    )
    async with gateway(settings, wait=False) as served:
        await served.wait_ready("tiny-gguf", timeout_s=120)
        yield served


async def test_chat_and_stream_on_the_gguf_engine(gw: Gateway) -> None:
    async with gw.sdk(timeout=60) as sdk:
        whole = await sdk.chat.completions.create(model=GGUF, messages=HELLO, max_tokens=5)
        stream = await sdk.chat.completions.create(
            model=GGUF, messages=HELLO, max_tokens=4, stream=True
        )
        chunks = [chunk async for chunk in stream]
        models = await sdk.models.list()
    assert whole.model == GGUF
    assert whole.usage is not None
    # llama-cpp-python counts completion tokens by tokenizing the text it produced again: on
    # the random model's noise that is a few more than it generated, never none.
    assert whole.usage.completion_tokens > 0
    assert whole.usage.prompt_tokens > 0
    assert chunks
    assert chunks[-1].choices[0].finish_reason in ("length", "stop")
    listed = {model.id: model.model_dump() for model in models.data}
    assert listed[GGUF]["state"] == "ready"
    assert listed[GGUF]["profile"] == "tiny-gguf"


async def test_the_stream_without_engine_usage_is_counted_from_its_deltas(gw: Gateway) -> None:
    # llama-cpp-python's streams carry no usage even when asked: the gateway counts the deltas.
    body = {"model": GGUF, "messages": HELLO, "max_tokens": 6, "stream": True,
            "stream_options": {"include_usage": True}}  # fmt: skip
    async with gw.http.stream("POST", "/v1/chat/completions", json=body, timeout=60) as response:
        assert response.status_code == 200
        lines = [line async for line in response.aiter_lines()]
    assert lines[-2:] == ["data: [DONE]", ""]
    status = await gw.engine_status()
    assert status["state"] == "ready"


async def test_anthropic_messages_are_translated_for_llama_cpp(gw: Gateway) -> None:
    async with anthropic.AsyncAnthropic(
        base_url=gw.url, api_key="unused", max_retries=0, timeout=60
    ) as sdk:
        message = await sdk.messages.create(
            model=GGUF, max_tokens=5, messages=[{"role": "user", "content": "hello"}]
        )
    assert message.type == "message"
    assert message.model == GGUF
    assert message.content[0].type == "text"
    assert message.usage.output_tokens > 0  # the engine's count (see above)
    assert message.stop_reason in ("max_tokens", "end_turn")


async def test_switch_to_vllm_and_back(gw: Gateway) -> None:
    to_vllm = await gw.switch("tiny-cpu", exclusive=True)
    assert to_vllm["status"] == "succeeded", to_vllm
    async with gw.sdk(timeout=60) as sdk:
        on_vllm = await sdk.chat.completions.create(
            model="tiny-llama", messages=HELLO, max_tokens=3
        )
    assert on_vllm.model == "tiny-llama"
    back = await gw.switch("tiny-gguf", exclusive=True)
    assert back["status"] == "succeeded", back
    engines = await gw.http.get("/api/models/engines", headers=AUTH)
    states = {e["profile_id"]: e["state"] for e in engines.json()["engines"]}
    assert states.get("tiny-gguf") == "ready"
    assert states.get("tiny-cpu") in (None, "idle")
    async with gw.sdk(timeout=60) as sdk:
        again = await sdk.chat.completions.create(model=GGUF, messages=HELLO, max_tokens=3)
    assert again.model == GGUF


async def test_engine_killed_mid_stream_ends_with_an_error_event(gw: Gateway) -> None:
    engine = gw.manager.engine("tiny-gguf")
    assert engine is not None
    handle = engine.handle
    assert handle is not None
    body = {"model": GGUF, "messages": HELLO, "max_tokens": 200, "stream": True}
    events: list[Any] = []
    killed = False
    async with gw.http.stream("POST", "/v1/chat/completions", json=body, timeout=60) as response:
        assert response.status_code == 200
        async for line in response.aiter_lines():
            if not line.startswith("data: "):
                continue
            data = line[6:]
            events.append(data if data == "[DONE]" else orjson.loads(data))
            if not killed:
                os.killpg(int(handle.id), signal.SIGKILL)  # the server and its children
                killed = True
    assert killed
    if events[-1] == "[DONE]":
        pytest.fail("the tiny model finished 200 tokens before the kill reached it")
    assert "error" in events[-1]
    assert events[-1]["error"]["code"] == "upstream_disconnected"
    assert any(isinstance(e, dict) and e.get("choices") for e in events[:-1])

    async def restarted() -> bool | None:
        status = await gw.engine_status()
        return True if status["state"] == "ready" and status["restarts"] >= 1 else None

    # The crash is the engine's: it is restarted as a vLLM engine would be.
    await eventually(restarted, timeout_s=120)
