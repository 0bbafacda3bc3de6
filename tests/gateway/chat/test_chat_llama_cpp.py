"""POST /api/chat on a GGUF model served by real llama.cpp (llama-cpp-python's server, the tiny
GGUF) on Postgres: a reply is stored, and an engine killed mid-stream leaves exactly what the
client received, marked incomplete, as with vLLM."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.helpers.chat import settled_reply
from tests.helpers.paths import REPO
from tests.helpers.polling import eventually
from tests.helpers.proxy import gateway
from tests.helpers.quota import bearer, create_user, login, quota_settings

pytestmark = pytest.mark.postgres


def _profiles(gguf: Path) -> dict[str, Any]:
    profile = yaml.safe_load((REPO / "model_profiles.yml").read_text())["profiles"]["tiny-gguf"]
    profile["model"] = str(gguf)
    return {"tiny-gguf": profile}


async def test_engine_killed_mid_chat_keeps_exactly_what_was_delivered(
    llama_cpp_install: tuple[Path, Path], pg_url: str
) -> None:
    llama_python, gguf = llama_cpp_install
    settings = quota_settings(
        pg_url,
        profiles=_profiles(gguf),
        default="tiny-gguf",
        LLAMA_CPP_PYTHON=str(llama_python),
        ENGINE_RESTART_MAX=0,
    )
    async with gateway(settings, wait=False) as gw:
        await gw.wait_ready("tiny-gguf", timeout_s=120)
        http = gw.http
        await create_user(http, "alice")
        token = await login(http, "alice")
        whole = await http.post(
            "/api/chat",
            json={"message": "hello", "max_tokens": 4},
            headers=bearer(token),
            timeout=60,
        )
        assert whole.status_code == 200, whole.text
        assert whole.json()["choices"][0]["message"]["content"]

        engine = gw.manager.engine("tiny-gguf")
        assert engine is not None
        assert engine.handle is not None
        pid = int(engine.handle.id)
        events: list[Any] = []
        text = ""
        killed = False
        async with http.stream(
            "POST",
            "/api/chat",
            json={"message": "hello", "stream": True, "max_tokens": 200},
            headers=bearer(token),
            timeout=60,
        ) as response:
            assert response.status_code == 200
            conversation_id = response.headers["X-Conversation-Id"]
            message_id = response.headers["X-Message-Id"]
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[len("data: ") :]
                event = data if data == "[DONE]" else json.loads(data)
                events.append(event)
                if isinstance(event, dict):
                    for choice in event.get("choices", []):
                        text += choice["delta"].get("content") or ""
                if not killed and text:
                    os.killpg(pid, signal.SIGKILL)
                    killed = True
        assert killed
        assert "[DONE]" not in events, "the reply finished before the kill reached the engine"
        assert isinstance(events[-1], dict)
        assert events[-1]["error"]["code"] == "upstream_disconnected"
        saved = await eventually(lambda: settled_reply(http, token, conversation_id), 10)
        assert saved["id"] == message_id
        assert saved["status"] == "incomplete"
        assert saved["content"] == text
