"""Two gateway replicas on one PostgreSQL, one Redis and one real local Ray cluster: exactly
one leads the fleet, the other serves the engines it mirrors from the cluster's registry and
runs its fleet operations on the leader; kill the leader under traffic and the other takes over
without restarting any engine."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any, cast

import httpx
import ray

from gateway.migrate import upgrade
from orchestrator.cluster import connect, disconnect
from orchestrator.runtimes.ray import NAMESPACE
from tests.gateway.proxy.test_fleet import CHAT_8B, CODER_7B, stand_in
from tests.gateway.proxy.test_ray_fleet import BOXES
from tests.helpers.gateway_process import gateway_process
from tests.helpers.polling import eventually
from tests.helpers.proxy import ADMIN_KEY, AUTH, HELLO, write_profiles
from tests.helpers.ray_cluster import ray_cluster

INSTANCE = "replicas"


async def fleet(client: httpx.AsyncClient) -> dict[str, Any]:
    response = await client.get("/api/models/engines", headers=AUTH)
    assert response.status_code == 200, response.text
    data: dict[str, Any] = response.json()
    return data


async def serves(client: httpx.AsyncClient, model: str) -> bool:
    body = {"model": model, "messages": HELLO, "max_tokens": 2}
    try:
        response = await client.post("/v1/chat/completions", json=body, timeout=60)
    except httpx.HTTPError:
        return False
    return response.status_code == 200


def engine_record(profile_id: str) -> dict[str, Any]:
    actor = ray.get_actor(f"{INSTANCE}.{profile_id}", namespace=NAMESPACE)
    return cast("dict[str, Any]", ray.get(actor.record.remote(), timeout=30))


async def test_one_replica_leads_the_other_follows_and_takes_over_under_traffic(
    postgres_url: str, redis_url: str, tmp_path: Path
) -> None:
    await asyncio.to_thread(upgrade, postgres_url)
    profiles = {"coder": stand_in("coder", CODER_7B), "chat": stand_in("chat", CHAT_8B)}
    path = write_profiles(profiles, "coder")
    with ray_cluster(BOXES) as cluster:
        settings = {
            "RAY_ADDRESS": cluster.address,
            "INSTANCE_NAME": INSTANCE,
            "DATABASE_URL": postgres_url,
            "REDIS_URL": redis_url,
            "ENGINE": "auto",
            "ENVIRONMENT": "development",
            "MODEL_PROFILES": str(path),
            "DEFAULT_PROFILE": "coder",
            "ADMIN_API_KEY": ADMIN_KEY,
            "RATE_LIMIT_REQUESTS": "0",
            "RATE_LIMIT_STANDARD_PER_MINUTE": "0",
            "RATE_LIMIT_STANDARD_PER_HOUR": "0",
            "RATE_LIMIT_STANDARD_TOKENS_PER_MINUTE": "0",
            "FLEET_LEASE_INTERVAL_S": "0.5",
        }
        connect(cluster.address, NAMESPACE)
        try:
            async with gateway_process(None, tmp_path, **settings) as (a, a_process):
                await eventually(lambda: serves(a, "coder"), timeout_s=120, interval_s=0.5)
                led = await fleet(a)
                assert led["role"] == "leader"
                coder = engine_record("coder")
                async with gateway_process(None, tmp_path, **settings) as (b, _):
                    followed = await fleet(b)
                    assert followed["role"] == "follower"
                    assert followed["leader_url"] == led["leader_url"]
                    # The follower serves the leader's engine, mirrored from the registry.
                    assert await serves(b, "coder")
                    # A fleet operation on the follower runs on the leader.
                    load = await b.post("/api/models/chat/load", headers=AUTH)
                    assert load.status_code == 202, load.text

                    async def chat_loaded() -> bool:
                        engines = {e["profile_id"]: e for e in (await fleet(b))["engines"]}
                        return bool(engines.get("chat", {}).get("state") == "ready")

                    await eventually(chat_loaded, timeout_s=120, interval_s=0.5)
                    chat = engine_record("chat")
                    assert chat["term"] == led["term"]  # the leader started it
                    assert await serves(a, "chat")
                    assert await serves(b, "chat")

                    # Traffic on the follower while the leader is killed; a stream in flight
                    # on the leader dies with it.
                    statuses: list[int] = []
                    stop = asyncio.Event()

                    async def traffic() -> None:
                        body = {"model": "coder", "messages": HELLO, "max_tokens": 2}
                        while not stop.is_set():
                            response = await b.post("/v1/chat/completions", json=body, timeout=60)
                            statuses.append(response.status_code)
                            await asyncio.sleep(0.05)

                    async def long_stream() -> str:
                        body = {
                            "model": "coder",
                            "messages": HELLO,
                            "max_tokens": 2000,
                            "ignore_eos": True,
                            "stream": True,
                        }
                        try:
                            async with a.stream(
                                "POST", "/v1/chat/completions", json=body, timeout=60
                            ) as response:
                                if response.status_code != 200:
                                    return f"status {response.status_code}"
                                async for _ in response.aiter_lines():
                                    pass
                        except httpx.HTTPError as exc:
                            return type(exc).__name__
                        return "completed"

                    load_task = asyncio.create_task(traffic())
                    stream_task = asyncio.create_task(long_stream())
                    await asyncio.sleep(1.0)
                    killed_at = time.monotonic()
                    a_process.kill()

                    async def leads() -> bool:
                        return bool((await fleet(b))["role"] == "leader")

                    await eventually(leads, timeout_s=30, interval_s=0.1)
                    takeover_s = time.monotonic() - killed_at
                    await asyncio.sleep(1.0)
                    stop.set()
                    await load_task
                    streamed = await stream_task
                    print(f"leader killed -> follower leads in {takeover_s:.2f}s")

                    # In flight on the dead process: cut off, not completed.
                    assert streamed in {"RemoteProtocolError", "ReadError"}, streamed
                    assert statuses
                    assert set(statuses) == {200}, statuses  # none failed on the follower
                    took = await fleet(b)
                    assert took["term"] > led["term"]
                    # Adopted, not restarted: the same engine processes, fenced by the new term.
                    assert engine_record("coder")["pid"] == coder["pid"]
                    assert engine_record("chat")["pid"] == chat["pid"]
                    assert engine_record("coder")["term"] == took["term"]
                    # It leads now: its own fleet operations run here.
                    unload = await b.post("/api/models/chat/unload", headers=AUTH)
                    assert unload.status_code == 202, unload.text

                    async def chat_gone() -> bool:
                        try:
                            engine_record("chat")
                        except ValueError:
                            return True
                        return False

                    await eventually(chat_gone, timeout_s=60, interval_s=0.5)
        finally:
            disconnect()
