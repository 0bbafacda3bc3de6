"""The fleet's admin API against real simulator engines: load, unload, sleep and wake jobs, the
engines view with each GPU's split, the exclusive switch, jobs of every kind, and the refusals
in the API's own error shape."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest

from tests.helpers.paths import DUAL_3090_SNAPSHOT
from tests.helpers.polling import eventually
from tests.helpers.profiles import llama_70b
from tests.helpers.proxy import AUTH, HELLO, Gateway, gateway, gateway_settings, sim_profile

GIB = 1024**3
# Qwen2 7B's shape: a simulator declaring it is placed on the GPUs as that model.
QWEN2_7B = {
    "params_b": 7.616,
    "layers": 28,
    "attention_heads": 28,
    "kv_heads": 4,
    "head_dim": 128,
    "max_context": 32768,
}


def sleepy_profile(name: str, **fields: Any) -> dict[str, Any]:
    """A simulator engine with vLLM's sleep mode (sleep_level 1 unless given)."""
    return {
        "display_name": f"Sleepy simulator {name}",
        "engine": "simulator",
        "runtime": "process",
        "served_model_name": name,
        "sleep_level": 1,
        "startup_timeout_s": 30,
        **fields,
    }


PROFILES = {
    "sim-a": sim_profile("sim-a", aliases=("model-a",)),
    "sim-b": sim_profile("sim-b"),
    "sim-sleepy": sleepy_profile("sim-sleepy"),
    "sim-slow": sim_profile("sim-slow", "--startup-delay", "3"),
    # 131 GiB of weights and no GPU here: it can never run.
    "too-big": llama_70b("too-big"),
}


@pytest.fixture
async def gw() -> AsyncIterator[Gateway]:
    async with gateway(gateway_settings(PROFILES, "sim-a")) as served:
        yield served


async def post(gw: Gateway, path: str, body: dict[str, Any] | None = None) -> Any:
    return await gw.http.post(path, json=body, headers=AUTH)


async def get(gw: Gateway, path: str) -> Any:
    response = await gw.http.get(path, headers=AUTH)
    assert response.status_code == 200, response.text
    return response.json()


async def finished(gw: Gateway, job_id: str, timeout_s: float = 60.0) -> dict[str, Any]:
    """Poll GET /api/models/jobs/{id} until the job has an outcome."""

    async def outcome() -> dict[str, Any] | None:
        job: dict[str, Any] = await get(gw, f"/api/models/jobs/{job_id}")
        return None if job["status"] in ("pending", "running") else job

    job: dict[str, Any] = await eventually(outcome, timeout_s)
    return job


async def run_job(gw: Gateway, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
    """POST a job route (202) and wait for its outcome."""
    accepted = await post(gw, path, body)
    assert accepted.status_code == 202, accepted.text
    return await finished(gw, accepted.json()["job_id"])


async def engines(gw: Gateway) -> dict[str, dict[str, Any]]:
    """GET /api/models/engines -> engines by profile id."""
    fleet = await get(gw, "/api/models/engines")
    return {engine["profile_id"]: engine for engine in fleet["engines"]}


async def listed(gw: Gateway) -> dict[str, dict[str, Any]]:
    """GET /v1/models -> entries by id."""
    response = await gw.http.get("/v1/models")
    assert response.status_code == 200, response.text
    return {entry["id"]: entry for entry in response.json()["data"]}


def error(response: Any, status: int) -> dict[str, Any]:
    """The error of a refusal in the API's own envelope."""
    assert response.status_code == status, response.text
    assert response.headers["x-error-source"] == "gateway"
    body: dict[str, Any] = response.json()["error"]
    return body


async def chat(gw: Gateway, model: str) -> dict[str, Any]:
    response = await gw.http.post(
        "/v1/chat/completions", json={"model": model, "messages": HELLO, "max_tokens": 3}
    )
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


async def test_load_beside_the_default_then_unload(gw: Gateway) -> None:
    fleet = await get(gw, "/api/models/engines")
    assert fleet["default_profile"] == "sim-a"
    assert fleet["max_engines"] == 4
    assert [e["profile_id"] for e in fleet["engines"]] == ["sim-a"]  # never-run: not listed
    only = fleet["engines"][0]
    assert (only["state"], only["is_default"], only["node"]) == ("ready", True, "local")
    assert only["aliases"] == ["model-a"]
    assert only["last_load_s"] > 0
    assert only["job"] is None

    loaded = await run_job(gw, "/api/models/sim-b/load")
    assert (loaded["kind"], loaded["status"], loaded["exclusive"]) == ("load", "succeeded", False)
    both = await engines(gw)
    assert {pid: e["state"] for pid, e in both.items()} == {"sim-a": "ready", "sim-b": "ready"}
    assert both["sim-b"]["is_default"] is False
    # The default stays what "current" names; sim-b serves requests that name it.
    assert (await chat(gw, "current"))["model"] == "sim-a"
    assert (await chat(gw, "sim-b"))["model"] == "sim-b"
    assert (await listed(gw))["sim-b"]["state"] == "ready"

    unloaded = await run_job(gw, "/api/models/sim-b/unload")
    assert (unloaded["kind"], unloaded["status"]) == ("unload", "succeeded")
    after = await engines(gw)
    assert after["sim-b"]["state"] == "idle"
    assert after["sim-a"]["state"] == "ready"
    assert (await listed(gw))["sim-b"]["state"] == "not_loaded"

    recent = (await get(gw, "/api/models/jobs"))["jobs"]
    assert [(j["kind"], j["profile_id"]) for j in recent[:2]] == [
        ("unload", "sim-b"),
        ("load", "sim-b"),
    ]
    # The switch route's job view reads every kind, too.
    same = await get(gw, f"/api/models/switch/{unloaded['job_id']}")
    assert same["kind"] == "unload"


async def test_sleep_and_wake_follow_the_simulators_sleep_contract(gw: Gateway) -> None:
    assert (await run_job(gw, "/api/models/sim-sleepy/load"))["status"] == "succeeded"
    sleepy = gw.manager.engine("sim-sleepy")
    engine_url, key = sleepy.base_url, sleepy.spec.api_key

    slept = await run_job(gw, "/api/models/sim-sleepy/sleep")
    assert (slept["kind"], slept["status"]) == ("sleep", "succeeded")
    asleep = (await engines(gw))["sim-sleepy"]
    assert (asleep["state"], asleep["sleep_level"], asleep["profile_sleep_level"]) == (
        "asleep",
        1,
        1,
    )
    # The engine itself says it sleeps.
    probe = await gw.http.get(
        f"{engine_url}/is_sleeping", headers={"Authorization": f"Bearer {key}"}
    )
    assert probe.json() == {"is_sleeping": True}
    entry = (await listed(gw))["sim-sleepy"]
    assert entry["state"] == "sleeping"
    assert entry["wake_s"] is None
    assert entry["load_s"] > 0
    again = error(await post(gw, "/api/models/sim-sleepy/sleep"), 409)
    assert again["code"] == "engine_not_ready"
    assert "asleep" in again["message"]

    woke = await run_job(gw, "/api/models/sim-sleepy/wake")
    assert (woke["kind"], woke["status"]) == ("wake", "succeeded")
    awake = (await engines(gw))["sim-sleepy"]
    assert (awake["state"], awake["sleep_level"]) == ("ready", 0)
    assert awake["last_wake_s"] >= 0
    assert (await listed(gw))["sim-sleepy"]["wake_s"] == awake["last_wake_s"]
    assert (await chat(gw, "sim-sleepy"))["model"] == "sim-sleepy"
    not_asleep = error(await post(gw, "/api/models/sim-sleepy/wake"), 409)
    assert not_asleep["code"] == "not_asleep"

    # Level 2 when asked (weights discarded; the wake reloads them), on an engine the profile
    # gives no sleep mode: a level given is a level used.
    deep = await run_job(gw, "/api/models/sim-a/sleep", {"level": 2})
    assert deep["status"] == "succeeded", deep
    assert (await engines(gw))["sim-a"]["sleep_level"] == 2
    assert (await run_job(gw, "/api/models/sim-a/wake"))["status"] == "succeeded"
    assert (await chat(gw, "model-a"))["model"] == "model-a"


async def test_refusals_name_the_problem(gw: Gateway) -> None:
    for action in ("load", "unload", "sleep", "wake"):
        unknown = error(await post(gw, f"/api/models/nope/{action}"), 404)
        assert unknown["code"] == "profile_not_found", action
        assert "sim-a, sim-b, sim-sleepy" in unknown["message"]
        invalid = error(await post(gw, f"/api/models/Not_An_Id/{action}"), 400)
        assert invalid["param"] == "profile_id", action
    too_big = error(await post(gw, "/api/models/too-big/load"), 409)
    assert too_big["code"] == "profile_does_not_fit"
    no_mode = error(await post(gw, "/api/models/sim-a/sleep"), 409)
    assert no_mode["code"] == "sleep_not_supported"
    not_loaded = error(await post(gw, "/api/models/sim-b/sleep", {"level": 1}), 409)
    assert not_loaded["code"] == "engine_not_ready"
    assert error(await post(gw, "/api/models/sim-b/wake"), 409)["code"] == "not_asleep"
    bad_level = error(await post(gw, "/api/models/sim-sleepy/sleep", {"level": 3}), 400)
    assert bad_level["param"] == "level"
    missing = error(await gw.http.get("/api/models/jobs/deadbeef", headers=AUTH), 404)
    assert missing["code"] == "job_not_found"

    # A job acting on an engine: another job on it is refused, naming it; a second load is
    # the same job.
    accepted = await post(gw, "/api/models/sim-slow/load")
    assert accepted.status_code == 202, accepted.text
    job_id = accepted.json()["job_id"]
    for action in ("unload", "sleep", "wake"):
        busy = error(await post(gw, f"/api/models/sim-slow/{action}", None), 409)
        assert busy["code"] == "job_in_progress", action
        assert job_id in busy["message"], action
    assert (await post(gw, "/api/models/sim-slow/load")).json()["job_id"] == job_id
    loading = (await engines(gw))["sim-slow"]
    assert loading["state"] in ("starting", "loading")
    assert loading["job"]["job_id"] == job_id
    assert (await listed(gw))["sim-slow"]["state"] == "loading"
    assert (await finished(gw, job_id))["status"] == "succeeded"
    assert (await engines(gw))["sim-slow"]["job"] is None


async def test_an_exclusive_switch_stops_every_other_engine(gw: Gateway) -> None:
    beside = await run_job(gw, "/api/models/switch", {"profile_id": "sim-b"})
    assert (beside["kind"], beside["exclusive"], beside["status"]) == ("switch", False, "succeeded")
    assert {pid: e["state"] for pid, e in (await engines(gw)).items()} == {
        "sim-a": "ready",
        "sim-b": "ready",
    }
    alone = await run_job(gw, "/api/models/switch", {"profile_id": "sim-a", "exclusive": True})
    assert (alone["exclusive"], alone["status"]) == (True, "succeeded")
    fleet = await get(gw, "/api/models/engines")
    assert fleet["default_profile"] == "sim-a"
    states = {e["profile_id"]: (e["state"], e["is_default"]) for e in fleet["engines"]}
    assert states == {"sim-a": ("ready", True), "sim-b": ("idle", False)}


async def test_each_gpu_splits_into_others_our_engines_and_free() -> None:
    # The recorded dual-3090 reading; the simulator stands in for Qwen2 7B at 8k context.
    profiles = {
        "sim-7b": sleepy_profile("sim-7b", architecture=QWEN2_7B, vllm={"max_model_len": 8192}),
        "sim-a": sim_profile("sim-a"),
    }
    settings = gateway_settings(profiles, "sim-7b", GPU_SNAPSHOT=str(DUAL_3090_SNAPSHOT))
    async with gateway(settings) as gw:
        fleet = await get(gw, "/api/models/engines")
        engine = next(e for e in fleet["engines"] if e["profile_id"] == "sim-7b")
        assert len(engine["gpu_ids"]) == 1
        gpu_id = engine["gpu_ids"][0]
        claim = engine["claim_bytes_per_gpu"]
        assert 8 * GIB < claim < 24 * GIB
        assert engine["held_bytes_per_gpu"] == claim
        by_index = {g["index"]: g for g in fleet["gpus"]}
        assert set(by_index) == {0, 1}
        for index, gpu in by_index.items():
            # The snapshot's processes are not ours: all its used memory is someone else's.
            assert gpu["not_ours_bytes"] == gpu["used_bytes"] > 0
            held = claim if index == gpu_id else 0
            assert gpu["free_bytes"] == gpu["total_bytes"] - gpu["used_bytes"] - held
        assert by_index[gpu_id]["engines"] == [
            {"profile_id": "sim-7b", "bytes": claim, "state": "ready"}
        ]
        assert by_index[1 - gpu_id]["engines"] == []

        assert (await run_job(gw, "/api/models/sim-7b/sleep"))["status"] == "succeeded"
        fleet = await get(gw, "/api/models/engines")
        asleep = next(e for e in fleet["engines"] if e["profile_id"] == "sim-7b")
        residual = asleep["held_bytes_per_gpu"]
        assert 0 < residual < claim
        assert asleep["claim_bytes_per_gpu"] == claim
        gpu = next(g for g in fleet["gpus"] if g["index"] == gpu_id)
        assert gpu["engines"] == [{"profile_id": "sim-7b", "bytes": residual, "state": "asleep"}]
        assert gpu["free_bytes"] == gpu["total_bytes"] - gpu["used_bytes"] - residual
