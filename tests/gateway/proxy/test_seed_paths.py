"""The seeds' remaining paths: seed 004's /api/v1/* and /models, seed 000's /chat-streaming.

Seed 004's clients post to /api/v1/chat/completions, /api/v1/completions and /api/v1/embeddings
with bodies that name no model (the default model), list models at GET /models and load one
with POST /models/{model_name}/load. They are the same routes as /v1/* and the model API's load.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest

from tests.helpers.polling import eventually
from tests.helpers.proxy import AUTH, Gateway, gateway, gateway_settings, sim_profile

PROFILES: dict[str, dict[str, Any]] = {
    "sim-a": sim_profile("sim-a", aliases=("model-a",)),
    "sim-b": sim_profile("sim-b", aliases=("llama3-8b",)),
}
# Seed 004's request bodies, as its README sends them.
SEED_CHAT = {
    "messages": [
        {"role": "system", "content": "당신은 유용한 AI 어시스턴트입니다."},
        {"role": "user", "content": "안녕하세요, 저는 김철수입니다."},
    ],
    "max_tokens": 5,
    "temperature": 0.7,
}
SEED_COMPLETION = {"prompt": "안녕하세요, 저는", "max_tokens": 5, "temperature": 0.7}
SEED_EMBEDDING = {"input": "안녕하세요, 저는 김철수입니다."}


@pytest.fixture
async def gw() -> AsyncIterator[Gateway]:
    async with gateway(gateway_settings(PROFILES, "sim-a")) as served:
        yield served


async def test_seed_004_inference_paths_are_the_openai_routes(gw: Gateway) -> None:
    chat = await gw.http.post("/api/v1/chat/completions", json=SEED_CHAT)
    same = await gw.http.post("/v1/chat/completions", json=SEED_CHAT)
    completion = await gw.http.post("/api/v1/completions", json=SEED_COMPLETION)
    embedding = await gw.http.post("/api/v1/embeddings", json=SEED_EMBEDDING)
    streamed = await gw.http.post("/api/v1/chat/completions", json={**SEED_CHAT, "stream": True})
    named = await gw.http.post("/api/v1/chat/completions", json={**SEED_CHAT, "model": "model-a"})
    unknown = await gw.http.post("/api/v1/chat/completions", json={**SEED_CHAT, "model": "gpt-9"})
    bad = await gw.http.post("/api/v1/chat/completions", json={**SEED_CHAT, "max_tokens": -1})
    bad_v1 = await gw.http.post("/v1/chat/completions", json={**SEED_CHAT, "max_tokens": -1})

    # No model in the body: the default model answers, as on /v1/*.
    assert chat.status_code == 200, chat.text
    assert chat.json()["model"] == "sim-a"
    assert chat.json()["object"] == "chat.completion"
    assert chat.json()["usage"]["completion_tokens"] <= 5
    assert set(chat.json()) == set(same.json())
    assert completion.status_code == 200, completion.text
    assert completion.json()["object"] == "text_completion"
    assert completion.json()["choices"][0]["text"]
    assert embedding.status_code == 200, embedding.text
    vector = embedding.json()["data"][0]["embedding"]
    assert isinstance(vector, list)
    assert vector
    assert streamed.status_code == 200, streamed.text
    assert streamed.headers["content-type"].startswith("text/event-stream")
    assert streamed.text.rstrip().endswith("data: [DONE]")
    assert named.status_code == 200, named.text
    # Errors are the same as /v1/*'s: the same status, code and field.
    assert unknown.status_code == 404, unknown.text
    assert unknown.json()["error"]["code"] == "model_not_found"
    assert bad.status_code == 400, bad.text
    assert bad.json()["error"] == bad_v1.json()["error"]


async def test_seed_004_model_list_and_load_by_name(gw: Gateway) -> None:
    listed = await gw.http.get("/models")
    v1 = await gw.http.get("/v1/models")
    assert listed.status_code == 200, listed.text
    assert listed.json() == v1.json()
    assert {m["id"] for m in listed.json()["data"]} == {"sim-a", "sim-b"}

    # Loading is the model API's: admins only, even with REQUIRE_AUTH off.
    anonymous = await gw.http.post("/models/llama3-8b/load")
    assert anonymous.status_code == 401, anonymous.text
    accepted = await gw.http.post("/models/llama3-8b/load", headers=AUTH)
    assert accepted.status_code == 202, accepted.text
    job = accepted.json()
    assert (job["profile_id"], job["kind"]) == ("sim-b", "load")

    async def done() -> str | None:
        seen = (await gw.http.get(f"/api/models/jobs/{job['job_id']}", headers=AUTH)).json()
        return None if seen["status"] in ("pending", "running") else str(seen["status"])

    assert await eventually(done, 60) == "succeeded"
    states = {m["id"]: m["state"] for m in (await gw.http.get("/models")).json()["data"]}
    assert states == {"sim-a": "ready", "sim-b": "ready"}
    # By profile id too; an unknown name is a 404 naming the models there are.
    by_id = await gw.http.post("/models/sim-a/load", headers=AUTH)
    assert by_id.status_code == 202, by_id.text
    assert by_id.json()["profile_id"] == "sim-a"
    missing = await gw.http.post("/models/no-such-model/load", headers=AUTH)
    assert missing.status_code == 404, missing.text
    assert missing.json()["error"]["code"] == "model_not_found"
    assert "llama3-8b" in missing.json()["error"]["message"]
    slashed = await gw.http.post("/models/..%2Fapi/load", headers=AUTH)
    assert slashed.status_code in (400, 404), slashed.text


async def test_seed_000_chat_streaming_is_the_chat_page(gw: Gateway) -> None:
    chat = await gw.http.get("/chat")
    seed = await gw.http.get("/chat-streaming")
    assert seed.status_code == 200
    assert seed.headers["content-type"].startswith("text/html")
    assert seed.content == chat.content
    assert seed.headers["content-security-policy"] == chat.headers["content-security-policy"]
