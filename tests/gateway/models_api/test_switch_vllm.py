"""Switching through the API between the simulator and real vLLM (CPU build) as processes."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import yaml

from tests.helpers.app import engine_headers, make_settings, running_app
from tests.helpers.paths import REPO

pytestmark = pytest.mark.vllm

ADMIN_KEY = "sk-admin-test-vllm-switch-0001"
AUTH = {"Authorization": f"Bearer {ADMIN_KEY}"}


def _profiles_with_tiny_model(tmp_path: Path, model_dir: Path) -> Path:
    # The shipped file, with tiny-cpu pointed at this machine's tiny model (VCG_CACHE may move it).
    data = yaml.safe_load((REPO / "model_profiles.yml").read_text())
    data["profiles"]["tiny-cpu"]["model"] = str(model_dir)
    path = tmp_path / "model_profiles.yml"
    path.write_text(yaml.safe_dump(data))
    return path


async def _switch(client: httpx.AsyncClient, profile_id: str) -> dict[str, Any]:
    # Exclusive: one engine at a time, so each switch stops the engine before it.
    accepted = await client.post(
        "/api/models/switch", json={"profile_id": profile_id, "exclusive": True}
    )
    assert accepted.status_code == 202, accepted.text
    job_id = accepted.json()["job_id"]
    for _ in range(3000):
        job = (await client.get(f"/api/models/switch/{job_id}")).json()
        if job["status"] not in ("pending", "running"):
            return dict(job)
        await asyncio.sleep(0.1)
    raise AssertionError(f"switch to {profile_id} did not finish")


async def _chat(engine_url: str, model: str, headers: dict[str, str]) -> Any:
    """Straight to the engine, with the Authorization header it requires (its API key)."""
    api_key = headers["Authorization"].removeprefix("Bearer ")
    async with openai.AsyncOpenAI(base_url=f"{engine_url}/v1", api_key=api_key) as sdk:
        return await sdk.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": "hello"}],
            max_tokens=6,
            extra_body={"ignore_eos": True},
        )


async def _chat_through_gateway(client: httpx.AsyncClient, model: str) -> dict[str, Any]:
    """POST /v1/chat/completions to the gateway: it routes to whatever engine now serves."""
    response = await client.post(
        "/v1/chat/completions",
        json={
            "model": model,
            "messages": [{"role": "user", "content": "hello"}],
            "max_tokens": 6,
            "ignore_eos": True,
        },
    )
    assert response.status_code == 200, response.text
    return dict(response.json())


async def test_simulator_to_tiny_vllm_and_back(
    sqlite_url: str, tmp_path: Path, vllm_install: tuple[Path, Path]
) -> None:
    vllm_python, model_dir = vllm_install
    settings = make_settings(
        DATABASE_URL=sqlite_url,
        ADMIN_API_KEY=ADMIN_KEY,
        MODEL_PROFILES=str(_profiles_with_tiny_model(tmp_path, model_dir)),
        VLLM_PYTHON=str(vllm_python),
        ENGINE="none",
    )
    async with running_app(settings) as (app, client):
        client.headers.update(AUTH)
        served = []
        for profile_id, model in (
            ("simulator", "simulator"),
            ("tiny-cpu", "tiny-llama"),
            ("simulator", "simulator"),
        ):
            job = await _switch(client, profile_id)
            assert job["status"] == "succeeded", job
            status = (await client.get("/api/models/status")).json()["engine"]
            assert status["profile_id"] == profile_id
            assert model in status["served_names"]
            completion = await _chat(status["engine_url"], model, engine_headers(app))
            assert completion.model == model
            assert completion.usage is not None
            assert completion.usage.completion_tokens == 6
            # The same through the gateway: the switch changed what /v1 routes to, too.
            proxied = await _chat_through_gateway(client, model)
            assert proxied["model"] == model
            assert proxied["choices"][0]["message"]["role"] == "assistant"
            usage = proxied["usage"]
            assert usage["completion_tokens"] == 6
            assert usage["prompt_tokens"] > 0
            assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
            served.append((profile_id, status["engine_url"]))
        # The vLLM engine is gone once the simulator took over again.
        async with httpx.AsyncClient() as direct:
            with pytest.raises(httpx.ConnectError):
                await direct.get(f"{served[1][1]}/health")
