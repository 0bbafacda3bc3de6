"""GET /v1/models lists what this gateway can serve, one entry per model: resident, asleep or
able to fit the GPUs, each with its state, aliases and last load and wake times; a model that
can never run here is left out (the admin's profile list says why)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest

from tests.helpers.polling import eventually
from tests.helpers.profiles import llama_70b
from tests.helpers.proxy import AUTH, HELLO, Gateway, gateway, gateway_settings, sim_profile

PROFILES: dict[str, dict[str, Any]] = {
    "sim-a": sim_profile("sim-a", aliases=("model-a", "model-a2")),
    "sim-sleepy": {
        "display_name": "Sleepy simulator",
        "engine": "simulator",
        "runtime": "process",
        "served_model_name": "sim-sleepy",
        "sleep_level": 1,
    },
    "sim-broken": sim_profile("sim-broken", "--fail-at-start"),
    # 131 GiB of bf16 weights and no GPU here: it can never run.
    "too-big": llama_70b("too-big"),
}


@pytest.fixture
async def gw() -> AsyncIterator[Gateway]:
    async with gateway(gateway_settings(PROFILES, "sim-a")) as served:
        yield served


async def models(gw: Gateway) -> dict[str, dict[str, Any]]:
    """GET /v1/models -> entries by id, through the official SDK."""
    async with gw.sdk() as sdk:
        page = await sdk.models.list()
    return {model.id: model.model_dump() for model in page.data}


async def job_outcome(gw: Gateway, path: str) -> str:
    """POST an admin job route and wait for its status."""
    accepted = await gw.http.post(path, headers=AUTH)
    assert accepted.status_code == 202, accepted.text
    job_id = accepted.json()["job_id"]

    async def done() -> str | None:
        job = (await gw.http.get(f"/api/models/jobs/{job_id}", headers=AUTH)).json()
        return None if job["status"] in ("pending", "running") else str(job["status"])

    status: str = await eventually(done, 60)
    return status


async def test_one_entry_per_model_that_can_run_here(gw: Gateway) -> None:
    listed = await models(gw)
    assert set(listed) == {"sim-a", "sim-sleepy", "sim-broken"}
    ready = listed["sim-a"]
    assert ready["object"] == "model"
    assert (ready["profile"], ready["state"]) == ("sim-a", "ready")
    assert ready["aliases"] == ["model-a", "model-a2"]
    assert ready["load_s"] > 0
    assert ready["wake_s"] is None
    idle = listed["sim-sleepy"]
    assert (idle["state"], idle["aliases"], idle["load_s"]) == ("not_loaded", [], None)
    # Left out of /v1/models, but the admin's profile list keeps it with the reason.
    profiles = (await gw.http.get("/api/models/profiles", headers=AUTH)).json()["profiles"]
    too_big = next(p for p in profiles if p["id"] == "too-big")
    assert too_big["verdict"]["fit"] == "does_not_fit"
    assert too_big["verdict"]["reasons"]
    # An alias is no entry of its own, yet requests naming it reach its model.
    chat = await gw.http.post(
        "/v1/chat/completions", json={"model": "model-a2", "messages": HELLO, "max_tokens": 2}
    )
    assert chat.status_code == 200, chat.text
    assert chat.json()["model"] == "model-a2"


async def test_states_follow_the_engines(gw: Gateway) -> None:
    assert await job_outcome(gw, "/api/models/sim-sleepy/load") == "succeeded"
    assert (await models(gw))["sim-sleepy"]["state"] == "ready"
    assert await job_outcome(gw, "/api/models/sim-sleepy/sleep") == "succeeded"
    assert (await models(gw))["sim-sleepy"]["state"] == "sleeping"
    assert await job_outcome(gw, "/api/models/sim-sleepy/wake") == "succeeded"
    woke = (await models(gw))["sim-sleepy"]
    assert woke["state"] == "ready"
    assert woke["wake_s"] >= 0
    assert await job_outcome(gw, "/api/models/sim-broken/load") == "failed"
    assert (await models(gw))["sim-broken"]["state"] == "failed"
    assert await job_outcome(gw, "/api/models/sim-sleepy/unload") == "succeeded"
    assert (await models(gw))["sim-sleepy"]["state"] == "not_loaded"
