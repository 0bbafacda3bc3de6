"""The fleet with real vLLM (CPU build): two engines of the tiny model under different served
names resident at once, both answering through the gateway, then one unloaded while the other
keeps serving. vLLM's sleep mode is CUDA-only, so the CPU build is evicted by a cold stop."""

from __future__ import annotations

import asyncio
import copy
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.helpers.paths import REPO
from tests.helpers.processes import pid_alive
from tests.helpers.proxy import HELLO, Gateway, gateway, gateway_settings

pytestmark = pytest.mark.vllm


@pytest.fixture(scope="module")
async def two(vllm_install: tuple[Path, Path]) -> AsyncIterator[Gateway]:
    vllm_python, model_dir = vllm_install
    shipped = yaml.safe_load((REPO / "model_profiles.yml").read_text())["profiles"]
    profiles: dict[str, Any] = {}
    for name in ("tiny-a", "tiny-b"):
        profile = copy.deepcopy(shipped["tiny-cpu"])  # YAML would write shared parts as aliases
        profile.update(model=str(model_dir), served_model_name=name, display_name=name)
        profiles[name] = profile
    settings = gateway_settings(profiles, "tiny-a", VLLM_PYTHON=str(vllm_python))
    async with gateway(settings, wait=False) as served:
        await served.wait_ready("tiny-a", timeout_s=300)
        yield served


async def _ask(gw: Gateway, model: str) -> Any:
    body = {"model": model, "messages": HELLO, "max_tokens": 4, "ignore_eos": True}
    return await gw.http.post("/v1/chat/completions", json=body, timeout=120)


async def test_two_vllm_engines_resident_at_once_then_one_unloaded(two: Gateway) -> None:
    gw = two
    job = gw.app.state.resources.models.load("tiny-b")
    done = await gw.manager.wait_job(job.id, timeout_s=300)
    assert done.status.value == "succeeded", (done.error, done.logs[-10:])
    a, b = gw.manager.engine("tiny-a"), gw.manager.engine("tiny-b")
    assert a is not None
    assert b is not None
    assert a.serves
    assert b.serves
    assert a.handle is not None
    assert b.handle is not None
    assert a.handle.id != b.handle.id
    answers = await asyncio.gather(_ask(gw, "tiny-a"), _ask(gw, "tiny-b"), _ask(gw, "current"))
    assert [r.status_code for r in answers] == [200, 200, 200], [r.text for r in answers]
    assert [r.json()["model"] for r in answers] == ["tiny-a", "tiny-b", "tiny-a"]
    assert all(r.json()["usage"]["completion_tokens"] == 4 for r in answers)
    # Unloading one stops its process; the other keeps serving.
    b_pid = int(b.handle.id)
    unloaded = await gw.manager.wait_job(gw.manager.request_unload("tiny-b").id, timeout_s=60)
    assert unloaded.status.value == "succeeded", unloaded.error
    assert b.state.value == "idle"
    assert not pid_alive(b_pid)
    still = await _ask(gw, "tiny-a")
    assert still.status_code == 200, still.text
    gone = await _ask(gw, "tiny-b")
    assert gone.status_code == 404
    assert gone.json()["error"]["code"] == "model_not_loaded"
