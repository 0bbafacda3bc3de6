"""The fleet on a real local Ray cluster (RAY_ADDRESS): a head and two worker raylets on
loopback, each declaring two logical GPUs with its own dual-3090 snapshot. Simulator engines
stand in for GPU models; the planner places each on one node's GPUs and the Ray runtime starts
it there as a detached actor.

Sizes on a 3090 (24 GiB, 10 % reserve: at most 21.6 GiB claimed): the 14B at tensor-parallel
size 2 claims 16.5 GiB on both GPUs of one node; the 7B coder 16.6 GiB and the 8B chat model
18.0 GiB, one GPU each; the 3B stand-ins 8.1 GiB, two per GPU.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any, cast

import httpx
import pytest
import ray

from orchestrator.cluster import connect, disconnect
from orchestrator.runtimes.ray import NAMESPACE
from tests.gateway.proxy.test_fleet import BIG_14B, CHAT_8B, CODER_7B, stand_in
from tests.helpers.gateway_process import gateway_process
from tests.helpers.paths import DUAL_3090_SNAPSHOT
from tests.helpers.polling import eventually
from tests.helpers.proxy import (
    ADMIN_KEY,
    AUTH,
    HELLO,
    Gateway,
    gateway,
    gateway_settings,
    write_profiles,
)
from tests.helpers.ray_cluster import RayCluster, WorkerBox, ray_cluster, stop_node

SMALL_3B = {
    "params_b": 3.09,
    "layers": 36,
    "attention_heads": 16,
    "kv_heads": 2,
    "head_dim": 128,
    "hidden_size": 2048,
    "max_context": 32768,
}
BOXES = [WorkerBox("box-a", 2, DUAL_3090_SNAPSHOT), WorkerBox("box-b", 2, DUAL_3090_SNAPSHOT)]


@pytest.fixture(scope="module")
def cluster() -> Iterator[RayCluster]:
    with ray_cluster(BOXES) as started:
        yield started


def ray_settings(cluster: RayCluster, profiles: dict[str, dict[str, Any]], default: str) -> Any:
    return gateway_settings(
        profiles,
        default,
        RAY_ADDRESS=cluster.address,
        INSTANCE_NAME=f"ray-{int(time.monotonic() * 1000) % 10**8}",
        AUTO_SWITCH=True,
        QUEUE_TIMEOUT_S=120,
        DRAIN_TIMEOUT_S=5,
        ENGINE_RESTART_BACKOFF_S=0.5,
    )


@pytest.fixture
async def across(cluster: RayCluster) -> AsyncIterator[Gateway]:
    profiles = {
        "big": stand_in("big", BIG_14B),
        "coder": stand_in("coder", CODER_7B),
        "chat": stand_in("chat", CHAT_8B),
    }
    async with gateway(ray_settings(cluster, profiles, "big")) as gw:
        yield gw


async def ask(gw: Gateway, model: str, wait_s: float = 120) -> httpx.Response:
    body = {"model": model, "messages": HELLO, "max_tokens": 3}
    return await gw.http.post("/v1/chat/completions", json=body, timeout=wait_s)


async def engines(gw: Gateway) -> dict[str, dict[str, Any]]:
    fleet = (await gw.http.get("/api/models/engines", headers=AUTH)).json()
    return {engine["profile_id"]: engine for engine in fleet["engines"]}


async def test_gpus_lists_every_node(across: Gateway, cluster: RayCluster) -> None:
    inventory = (await across.http.get("/api/gpus", headers=AUTH)).json()
    boxes = {cluster.node("box-a").node_id, cluster.node("box-b").node_id}
    assert inventory["count"] == 4
    assert {gpu["node"] for gpu in inventory["gpus"]} == boxes
    assert sorted((gpu["node"], gpu["node_index"]) for gpu in inventory["gpus"]) == sorted(
        (box, index) for box in boxes for index in (0, 1)
    )
    listed = {node["node_id"]: node for node in inventory["nodes"]}
    assert len(listed) == 3  # the head has no GPU
    assert [listed[box]["ray_gpus"] for box in boxes] == [2.0, 2.0]


async def test_engines_are_placed_on_one_node_each_across_both(
    across: Gateway, cluster: RayCluster
) -> None:
    for model in ("coder", "chat"):
        response = await ask(across, model)
        assert response.status_code == 200, response.text
    fleet = await engines(across)
    assert {fleet[p]["state"] for p in ("big", "coder", "chat")} == {"ready"}
    # The 14B holds both GPUs of one node; the coder and the chat model fit only on the other
    # node's two GPUs, one each. No engine spans nodes.
    gpus = (await across.http.get("/api/models/engines", headers=AUTH)).json()["gpus"]
    node_of = {gpu["index"]: gpu["node"] for gpu in gpus}
    assert {node_of[i] for i in fleet["big"]["gpu_ids"]} == {fleet["big"]["node"]}
    assert len(fleet["big"]["gpu_ids"]) == 2
    assert fleet["coder"]["node"] == fleet["chat"]["node"] != fleet["big"]["node"]
    assert {fleet["coder"]["node"], fleet["big"]["node"]} == {
        cluster.node("box-a").node_id,
        cluster.node("box-b").node_id,
    }
    assert fleet["coder"]["gpu_ids"] != fleet["chat"]["gpu_ids"]
    for model in ("big", "coder", "chat"):
        response = await ask(across, model)
        assert response.status_code == 200, response.text
        assert response.json()["model"] == model


async def test_a_lost_node_moves_its_engines_and_a_second_loss_gives_clear_503s() -> None:
    """Kill the raylet of the node serving two engines while requests run: requests in flight
    there fail, the engines go to the remaining node (two 3B stand-ins per GPU), the requests
    sent meanwhile wait and succeed. Then lose that node too: nothing fits, and requests get a
    503 that says why."""
    profiles = {name: stand_in(name, SMALL_3B) for name in ("a", "b", "c")}
    with ray_cluster(BOXES) as own:
        async with gateway(ray_settings(own, profiles, "a")) as gw:
            for model in ("b", "c"):
                assert (await ask(gw, model)).status_code == 200
            before = await engines(gw)
            # Three engines on four GPUs of two nodes: one node serves two of them.
            nodes = [before[p]["node"] for p in ("a", "b", "c")]
            lost_node = max(set(nodes), key=nodes.count)
            moved = sorted(p for p in ("a", "b", "c") if before[p]["node"] == lost_node)
            kept = sorted(p for p in ("a", "b", "c") if before[p]["node"] != lost_node)
            assert len(moved) == 2
            assert len(kept) == 1
            lost = next(node for node in own.nodes if node.node_id == lost_node)
            remaining = next(n for n in own.nodes if n.name != "head" and n is not lost)

            in_flight = [asyncio.create_task(ask(gw, moved[0])) for _ in range(3)]
            await asyncio.sleep(0.2)
            killed_at = time.monotonic()
            lost.kill_raylet()
            waiting = [asyncio.create_task(ask(gw, model)) for model in ("a", "b", "c")]

            async def moved_and_ready() -> bool:
                now = await engines(gw)
                return all(
                    now[p]["state"] == "ready" and now[p]["node"] == remaining.node_id
                    for p in moved
                )

            await eventually(moved_and_ready, timeout_s=90, interval_s=0.25)
            replaced_s = time.monotonic() - killed_at
            answers = await asyncio.gather(*waiting)
            assert [r.status_code for r in answers] == [200, 200, 200], [r.text for r in answers]
            done = await asyncio.gather(*in_flight, return_exceptions=True)
            # Requests that were on the lost node failed or finished; none hangs.
            assert len(done) == 3
            after = await engines(gw)
            assert after[kept[0]]["node"] == remaining.node_id  # untouched
            print(f"node lost -> its engines ready on the other node in {replaced_s:.1f}s")

            stop_node(lost)
            own.nodes.remove(lost)
            second_at = time.monotonic()
            remaining.kill_raylet()

            async def all_failed() -> bool:
                now = await engines(gw)
                return all(now[p]["state"] == "failed" for p in ("a", "b", "c"))

            await eventually(all_failed, timeout_s=90, interval_s=0.25)
            print(f"second node lost -> engines failed in {time.monotonic() - second_at:.1f}s")
            fleet = await engines(gw)
            assert "left the cluster" in (fleet["a"]["error"] or "")
            response = await ask(gw, "a", wait_s=30)
            assert response.status_code == 503, response.text
            error = response.json()["error"]
            assert error["code"] == "engine_unavailable"
            assert "node left the cluster" in error["message"]


async def test_a_restarted_gateway_adopts_the_engine_actor_without_reloading(
    cluster: RayCluster, tmp_path: Path
) -> None:
    """kill -9 the gateway: its engine (a detached actor) keeps running; the next gateway of
    the same INSTANCE_NAME finds it by name and serves through it (same process, same port).
    A graceful stop then stops it: nothing is left on the cluster."""
    path = write_profiles({"coder": stand_in("coder", CODER_7B)}, "coder")
    settings = {
        "RAY_ADDRESS": cluster.address,
        "INSTANCE_NAME": "ray-adopt",
        "ENGINE": "auto",
        "ENVIRONMENT": "development",
        "MODEL_PROFILES": str(path),
        "DEFAULT_PROFILE": "coder",
        "ADMIN_API_KEY": ADMIN_KEY,
    }
    connect(cluster.address, NAMESPACE)
    try:
        async with gateway_process(None, tmp_path, **settings) as (client, process):
            first = await _served_record(client)
            process.kill()
            await process.wait()
        async with gateway_process(None, tmp_path, **settings) as (client, _):
            adopted = await _served_record(client)
            assert (adopted["pid"], adopted["base_url"]) == (first["pid"], first["base_url"])
            assert adopted["started_at"] == first["started_at"]  # not started again
            fleet = (await client.get("/api/models/engines", headers=AUTH)).json()
            coder = next(e for e in fleet["engines"] if e["profile_id"] == "coder")
            assert coder["node"] == first["node_id"]
            assert len(coder["gpu_ids"]) == 1  # its claim, on the GPU its actor holds
        # The graceful stop above stopped the engine and its actor.
        with pytest.raises(ValueError, match="coder"):
            ray.get_actor("ray-adopt.coder", namespace=NAMESPACE)
    finally:
        disconnect()


async def _served_record(client: httpx.AsyncClient) -> dict[str, Any]:
    """Once the gateway serves the coder: its engine actor's record."""

    async def answered() -> bool:
        body = {"model": "coder", "messages": HELLO, "max_tokens": 2}
        response = await client.post("/v1/chat/completions", json=body, timeout=60)
        return response.status_code == 200

    await eventually(answered, timeout_s=120, interval_s=0.5)
    actor = ray.get_actor("ray-adopt.coder", namespace=NAMESPACE)
    return cast("dict[str, Any]", ray.get(actor.record.remote(), timeout=30))
