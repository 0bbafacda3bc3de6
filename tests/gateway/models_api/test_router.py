"""The model management API: admin gate, views, switch jobs with real engines, events, reload."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.settings import Settings
from tests.helpers.app import engine_headers, make_settings, running_app, served_app
from tests.helpers.polling import eventually

SNAPSHOT = Path(__file__).parents[2] / "fixtures" / "gpu" / "dual_rtx3090.json"
ADMIN_KEY = "sk-admin-test-7f3c9a1e5b2d4c6a"
AUTH = {"Authorization": f"Bearer {ADMIN_KEY}"}


def _settings(sqlite_url: str, profiles: Path | None = None, **extra: Any) -> Settings:
    values: dict[str, Any] = {"DATABASE_URL": sqlite_url, "ADMIN_API_KEY": ADMIN_KEY}
    if profiles is not None:
        values["MODEL_PROFILES"] = str(profiles)
    values.update(extra)
    return make_settings(**values)


async def _wait_job(client: httpx.AsyncClient, job_id: str) -> dict[str, Any]:
    for _ in range(600):
        job = (await client.get(f"/api/models/switch/{job_id}", headers=AUTH)).json()
        if job["status"] not in ("pending", "running"):
            return dict(job)
        await asyncio.sleep(0.05)
    raise AssertionError(f"job {job_id} did not finish")


async def _chat(client: httpx.AsyncClient, base_url: str, model: str) -> dict[str, Any]:
    response = await client.post(
        f"{base_url}/v1/chat/completions",
        json={"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4},
    )
    assert response.status_code == 200, response.text
    return dict(response.json())


ROUTES = [
    ("GET", "/api/models/status"),
    ("GET", "/api/models/profiles"),
    ("POST", "/api/models/switch"),
    ("GET", "/api/models/switch/abc123"),
    ("GET", "/api/models/hardware-recommendations"),
    ("POST", "/api/models/reload"),
    ("GET", "/api/gpus"),
    ("GET", "/api/models/events"),
]


@pytest.mark.parametrize(("method", "path"), ROUTES)
async def test_every_route_needs_the_admin_key(
    sqlite_url: str, profiles_file: Path, method: str, path: str
) -> None:
    async with running_app(_settings(sqlite_url, profiles_file)) as (_, client):
        missing = await client.request(method, path, json={"profile_id": "sim-b"})
        wrong = await client.request(
            method, path, json={"profile_id": "sim-b"}, headers={"Authorization": "Bearer nope"}
        )
        prefix = await client.request(
            method,
            path,
            json={"profile_id": "sim-b"},
            headers={"Authorization": f"Bearer {ADMIN_KEY[:-1]}"},
        )
        status = await client.get("/api/models/status")
    for response in (missing, wrong, prefix):
        assert response.status_code == 401
        assert response.json()["error"]["type"] == "authentication_error"
    assert status.json()["error"]["code"] == "missing_credentials"


async def test_without_an_admin_key_the_api_is_disabled(sqlite_url: str) -> None:
    async with running_app(make_settings(DATABASE_URL=sqlite_url)) as (_, client):
        response = await client.get("/api/models/status", headers=AUTH)
    assert response.status_code == 403
    assert response.json()["error"]["code"] == "admin_disabled"


async def test_profiles_and_gpus_on_the_dual_3090_snapshot(sqlite_url: str) -> None:
    settings = _settings(sqlite_url, GPU_SNAPSHOT=str(SNAPSHOT))
    async with running_app(settings) as (_, client):
        profiles = (await client.get("/api/models/profiles", headers=AUTH)).json()
        gpus = (await client.get("/api/gpus", headers=AUTH)).json()
        recs = (await client.get("/api/models/hardware-recommendations", headers=AUTH)).json()
        too_big = await client.post(
            "/api/models/switch", json={"profile_id": "llama-3-70b"}, headers=AUTH
        )
    by_id = {p["id"]: p for p in profiles["profiles"]}
    assert profiles["default_profile"] == "deepseek-r1-distill-14b"
    assert len(by_id) >= 12
    assert by_id["llama-3-70b"]["verdict"]["fit"] == "does_not_fit"
    assert by_id["qwen2-14b"]["verdict"]["tensor_parallel_size"] == 2
    assert by_id["simulator"]["verdict"]["fit"] == "fits"
    assert gpus["count"] == 2
    assert gpus["gpus"][0]["name"] == "NVIDIA GeForce RTX 3090"
    assert gpus["gpus"][0]["processes"][0]["pid"] == 1873
    rec_ids = [p["id"] for p in recs]
    assert "llama-3-70b" not in rec_ids
    assert "qwen2-7b" in rec_ids
    assert too_big.status_code == 409
    assert too_big.json()["error"]["code"] == "profile_does_not_fit"
    assert "GiB" in too_big.json()["error"]["message"]


async def test_switch_input_is_validated(sqlite_url: str, profiles_file: Path) -> None:
    async with running_app(_settings(sqlite_url, profiles_file)) as (_, client):
        unknown = await client.post("/api/models/switch", json={"profile_id": "nope"}, headers=AUTH)
        smuggled = await client.post(
            "/api/models/switch",
            json={"profile_id": "sim-b", "image": "evil/image:1", "command": ["sh"]},
            headers=AUTH,
        )
        traversal = await client.post(
            "/api/models/switch", json={"profile_id": "../../etc/passwd"}, headers=AUTH
        )
        missing_job = await client.get("/api/models/switch/deadbeef", headers=AUTH)
    assert unknown.status_code == 404
    message = unknown.json()["error"]["message"]
    assert "sim-a" in message
    assert "sim-b" in message
    assert smuggled.status_code == 400
    assert smuggled.json()["error"]["param"] in {"image", "command"}
    assert traversal.status_code == 400
    assert traversal.json()["error"]["param"] == "profile_id"
    assert missing_job.status_code == 404


async def test_switch_a_to_b_then_failed_switch_rolls_back(
    sqlite_url: str, profiles_file: Path
) -> None:
    settings = _settings(sqlite_url, profiles_file, ENGINE="auto")
    async with running_app(settings) as (app, client):
        for _ in range(400):
            status = (await client.get("/api/models/status", headers=AUTH)).json()
            if status["engine"]["state"] == "ready":
                break
            await asyncio.sleep(0.05)
        assert status["engine"]["profile_id"] == "sim-a"
        assert status["engine"]["served_names"] == ["sim-a", "model-a"]
        a_url = status["engine"]["engine_url"]

        # Exclusive: one engine at a time, sim-a is stopped before sim-b starts.
        accepted = await client.post(
            "/api/models/switch", json={"profile_id": "sim-b", "exclusive": True}, headers=AUTH
        )
        assert accepted.status_code == 202
        job = await _wait_job(client, accepted.json()["job_id"])
        assert job["status"] == "succeeded"
        assert (job["kind"], job["exclusive"]) == ("switch", True)
        assert job["previous_profile_id"] == "sim-a"
        assert job["events"][-1]["progress"] == 1.0
        status = (await client.get("/api/models/status", headers=AUTH)).json()
        assert status["engine"]["profile_id"] == "sim-b"
        b_url = status["engine"]["engine_url"]
        assert b_url != a_url
        # Straight to the engine: it takes only the key of its own start.
        async with httpx.AsyncClient(headers=engine_headers(app)) as direct:
            assert (await _chat(direct, b_url, "sim-b"))["model"] == "sim-b"
            with pytest.raises(httpx.ConnectError):
                await direct.get(f"{a_url}/health")

        broken = await client.post(
            "/api/models/switch", json={"profile_id": "sim-broken"}, headers=AUTH
        )
        job = await _wait_job(client, broken.json()["job_id"])
        assert job["status"] == "rolled_back"
        assert "exited during startup" in job["error"]
        assert any("out of memory" in line.lower() for line in job["logs"])
        status = (await client.get("/api/models/status", headers=AUTH)).json()
        assert status["engine"]["profile_id"] == "sim-b"
        assert status["engine"]["state"] == "ready"
        async with httpx.AsyncClient(headers=engine_headers(app)) as direct:
            await _chat(direct, status["engine"]["engine_url"], "sim-b")


async def test_concurrent_switches_one_runs_the_rest_409(sqlite_url: str, tmp_path: Path) -> None:
    import yaml

    from tests.helpers.profiles import switching_profiles

    path = tmp_path / "slow.yml"
    path.write_text(yaml.safe_dump(switching_profiles(delay_s=1.0)))
    async with running_app(_settings(sqlite_url, path, ENGINE="none")) as (_, client):
        responses = await asyncio.gather(
            *(
                client.post("/api/models/switch", json={"profile_id": "sim-b"}, headers=AUTH)
                for _ in range(10)
            )
        )
        codes = sorted(r.status_code for r in responses)
        assert codes == [202] + [409] * 9
        job_id = next(r.json()["job_id"] for r in responses if r.status_code == 202)
        for refused in (r for r in responses if r.status_code == 409):
            assert refused.json()["error"]["code"] == "switch_in_progress"
            assert job_id in refused.json()["error"]["message"]
        assert (await _wait_job(client, job_id))["status"] == "succeeded"


async def test_events_stream_reports_progress_to_ready(
    sqlite_url: str, profiles_file: Path
) -> None:
    settings = _settings(sqlite_url, profiles_file, ENGINE="none")
    events: list[tuple[str, dict[str, Any]]] = []
    async with (
        served_app(settings) as (_, base_url),
        httpx.AsyncClient(base_url=base_url, headers=AUTH, timeout=30) as client,
    ):

        async def follow() -> None:
            async with client.stream("GET", "/api/models/events") as stream:
                assert stream.headers["content-type"].startswith("text/event-stream")
                name = ""
                async for line in stream.aiter_lines():
                    if line.startswith("event:"):
                        name = line.split(":", 1)[1].strip()
                    elif line.startswith("data:"):
                        data = json.loads(line.split(":", 1)[1])
                        events.append((name, data))
                        if name == "progress" and data["state"] == "ready":
                            return

        follower = asyncio.create_task(follow())
        # The stream opens with the current status: switch only once the follower has it.
        await eventually(lambda: bool(events), 30)
        accepted = await client.post("/api/models/switch", json={"profile_id": "sim-a"})
        await asyncio.wait_for(follower, 30)
    assert events[0][0] == "status"
    assert events[0][1]["state"] == "idle"
    states = [data["state"] for name, data in events if name == "progress"]
    assert states[:3] == ["starting", "loading", "ready"]
    assert all(data["job_id"] == accepted.json()["job_id"] for _, data in events[1:])


async def test_reload_keeps_old_profiles_when_the_file_is_bad(
    sqlite_url: str, profiles_file: Path
) -> None:
    async with running_app(_settings(sqlite_url, profiles_file)) as (_, client):
        good = profiles_file.read_text()
        profiles_file.write_text(good.replace("display_name: Simulator B", "display_nam: oops"))
        bad = await client.post("/api/models/reload", headers=AUTH)
        still = (await client.get("/api/models/profiles", headers=AUTH)).json()
        profiles_file.write_text(good.replace("sim-b", "sim-c"))
        ok = await client.post("/api/models/reload", headers=AUTH)
        after = (await client.get("/api/models/profiles", headers=AUTH)).json()
    assert bad.status_code == 422
    assert "sim-b" in bad.json()["error"]["message"]
    assert "sim-b" in {p["id"] for p in still["profiles"]}
    assert ok.status_code == 200
    assert ok.json()["profiles"] == 4
    ids = {p["id"] for p in after["profiles"]}
    assert "sim-c" in ids
    assert "sim-b" not in ids


async def test_vllm_base_url_engine_is_the_active_model(sqlite_url: str) -> None:
    # Seed setup: an engine already runs at VLLM_BASE_URL; its served names come from /v1/models.
    import sys

    from tests.helpers.ports import free_port

    port = free_port()
    engine = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "simulator", "--host", "127.0.0.1"),
        *("--port", str(port), "--model", "served-elsewhere"),
        *("--served-model-name", "served-elsewhere", "alias-elsewhere"),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        settings = _settings(sqlite_url, ENGINE="auto", VLLM_BASE_URL=f"http://127.0.0.1:{port}/v1")
        async with running_app(settings) as (_, client):
            for _ in range(400):
                status = (await client.get("/api/models/status", headers=AUTH)).json()
                if status["engine"]["state"] == "ready":
                    break
                await asyncio.sleep(0.05)
            ready = await client.get("/health/ready")
        assert status["engine"]["profile_id"] == "external"
        assert status["engine"]["served_names"] == ["served-elsewhere", "alias-elsewhere"]
        assert status["engine"]["engine_url"] == f"http://127.0.0.1:{port}"
        assert ready.status_code == 200
        # The gateway does not own that engine: it is still running after the gateway stopped.
        assert engine.returncode is None
    finally:
        engine.terminate()
        await engine.wait()
