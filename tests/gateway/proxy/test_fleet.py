"""The fleet behind the proxy, on the dual-RTX-3090 snapshot, with real simulator processes
standing in for a 7B coder, an 8B chat model and a 14B model (the planner sizes and places each
as the model it stands in for; the processes allocate nothing).

Placement on that snapshot (24 GiB per GPU, 10 % reserve, 0.37 GiB used by the desktop on
GPU 0), written out by hand:

- coder (7B bf16, 8K): 14.19 GiB weights + 0.44 GiB KV + 2 GiB runtime = 16.6 GiB on one GPU;
- chat (8B bf16, 8K): 14.96 + 1.0 + 2 = 18.0 GiB on one GPU — not beside the coder on its GPU
  (21.2 GiB at most may be claimed on one), so on the other;
- big (14B bf16, 8K): 27.5 GiB of weights do not fit one GPU; at tensor-parallel size 2,
  13.75 + 0.75 + 2 = 16.5 GiB on each of both GPUs: the coder and the chat model must go.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
import yaml

from gateway.proxy.scheduler import VLLM_DEFAULT_SLOTS
from tests.helpers.paths import DUAL_3090_SNAPSHOT, REPO
from tests.helpers.polling import eventually
from tests.helpers.proxy import AUTH, HELLO, Gateway, gateway, gateway_settings

GIB = 1024**3
CODER_7B = {
    "params_b": 7.616,
    "layers": 28,
    "attention_heads": 28,
    "kv_heads": 4,
    "head_dim": 128,
    "hidden_size": 3584,
    "max_context": 32768,
}
CHAT_8B = {
    "params_b": 8.03,
    "layers": 32,
    "attention_heads": 32,
    "kv_heads": 8,
    "head_dim": 128,
    "hidden_size": 4096,
    "max_context": 8192,
}
BIG_14B = {
    "params_b": 14.77,
    "layers": 48,
    "attention_heads": 40,
    "kv_heads": 8,
    "head_dim": 128,
    "hidden_size": 5120,
    "max_context": 32768,
}


def stand_in(
    name: str,
    architecture: dict[str, Any],
    *flags: str,
    sleep_level: int = 0,
    pinned: bool = False,
) -> dict[str, Any]:
    """A simulator profile placed as the model `architecture` describes (bf16, 8K context)."""
    profile: dict[str, Any] = {
        "display_name": f"Simulator standing in for {name}",
        "engine": "simulator",
        "runtime": "process",
        "served_model_name": name,
        "architecture": dict(architecture),
        "vllm": {
            "dtype": "bfloat16",
            "max_model_len": 8192,
            "extra_args": ["--tokens-per-second", "200", *flags],
        },
        "startup_timeout_s": 30,
    }
    if sleep_level:
        profile["sleep_level"] = sleep_level
    if pinned:
        profile["pinned"] = True
    return profile


def fleet_settings(profiles: dict[str, dict[str, Any]], **overrides: Any) -> Any:
    values: dict[str, Any] = {
        "GPU_SNAPSHOT": str(DUAL_3090_SNAPSHOT),
        "AUTO_SWITCH": True,
        "QUEUE_TIMEOUT_S": 60,
        "DRAIN_TIMEOUT_S": 10,
    }
    values.update(overrides)
    return gateway_settings(profiles, "coder", **values)


@pytest.fixture
async def three() -> AsyncIterator[Gateway]:
    profiles = {
        "coder": stand_in("coder", CODER_7B),
        "chat": stand_in("chat", CHAT_8B),
        "big": stand_in("big", BIG_14B),
    }
    async with gateway(fleet_settings(profiles)) as gw:
        yield gw


async def _ask(gw: Gateway, model: str, tokens: int = 3) -> httpx.Response:
    body = {"model": model, "messages": HELLO, "max_tokens": tokens}
    return await gw.http.post("/v1/chat/completions", json=body, timeout=90)


def _gpus(gw: Gateway, profile_id: str) -> tuple[int, ...]:
    claim = gw.manager.claim(profile_id)
    assert claim is not None, f"{profile_id} has no claim"
    return tuple(claim.gpu_ids)


@contextlib.asynccontextmanager
async def ledger_watch(gw: Gateway) -> AsyncIterator[dict[int, int]]:
    """The most the ledger held on each GPU at any moment while the block ran (sampled every
    10 ms): the fleet must never claim more than a GPU has."""
    peaks: dict[int, int] = {}

    async def sample() -> None:
        while True:
            ledger = gw.manager.ledger()
            for gpu in (0, 1):
                peaks[gpu] = max(peaks.get(gpu, 0), ledger.held_on(gpu))
            await asyncio.sleep(0.01)

    task = asyncio.create_task(sample())
    try:
        yield peaks
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


GPU_BYTES = 24 * GIB  # each RTX 3090 of the snapshot


async def _simulated_memory(gw: Gateway, profile_id: str) -> int:
    """What the simulator itself reports it holds (its /metrics), to check the ledger by."""
    engine = gw.manager.engine(profile_id)
    assert engine is not None
    assert engine.base_url is not None
    metrics = (await gw.http.get(f"{engine.base_url}/metrics", headers=gw.engine_headers())).text
    for line in metrics.splitlines():
        if line.startswith("vllm:gpu_memory_allocated_bytes") or line.startswith(
            "simulator_gpu_memory_allocated_bytes"
        ):
            return int(float(line.rsplit(" ", 1)[1]))
    raise AssertionError("no simulated GPU memory in the engine's /metrics:\n" + metrics[:2000])


async def test_two_engines_resident_on_different_gpus_answer_at_once(three: Gateway) -> None:
    gw = three
    await gw.wait_ready("coder")
    assert _gpus(gw, "coder") == (1,)  # the GPU with the most room (GPU 0 runs a desktop)
    first = await _ask(gw, "chat")
    assert first.status_code == 200, first.text
    # Loaded beside the coder, on the other GPU; both serve at once.
    assert _gpus(gw, "chat") == (0,)
    coder, chat = gw.manager.engine("coder"), gw.manager.engine("chat")
    assert coder is not None
    assert chat is not None
    assert coder.serves
    assert chat.serves
    answers = await asyncio.gather(*(_ask(gw, m, 20) for m in ("coder", "chat") * 3))
    assert [a.status_code for a in answers] == [200] * 6
    assert [a.json()["model"] for a in answers] == ["coder", "chat"] * 3
    # The ledger's claims are what the engines were started with (the simulator reports it).
    for profile_id in ("coder", "chat"):
        claim = gw.manager.claim(profile_id)
        assert claim is not None
        assert await _simulated_memory(gw, profile_id) == claim.bytes_per_gpu
    coder_claim, chat_claim = gw.manager.claim("coder"), gw.manager.claim("chat")
    assert coder_claim is not None
    assert chat_claim is not None
    assert 16 * GIB < coder_claim.bytes_per_gpu < 17 * GIB
    assert 17.5 * GIB < chat_claim.bytes_per_gpu < 18.5 * GIB


async def test_a_model_needing_both_gpus_evicts_both(three: Gateway) -> None:
    gw = three
    await gw.wait_ready("coder")
    assert (await _ask(gw, "chat")).status_code == 200
    assert (await _ask(gw, "coder")).status_code == 200  # the chat model is now the LRU one
    response = await _ask(gw, "big")
    assert response.status_code == 200, response.text
    assert _gpus(gw, "big") == (0, 1)
    big = gw.manager.engine("big")
    assert big is not None
    assert big.spec is not None
    assert "--gpu-memory-bytes" in big.spec.command
    states = {e.profile_id: e.state.value for e in gw.manager.engines()}
    assert states == {"coder": "idle", "chat": "idle", "big": "ready"}
    assert gw.manager.evictions.get("placement_stop") == 2
    # "current" still names the coder, which was evicted: it is loaded again on demand.
    again = await _ask(gw, "current")
    assert again.status_code == 200, again.text


async def test_a_pinned_engine_is_never_a_victim() -> None:
    profiles = {
        "coder": stand_in("coder", CODER_7B, pinned=True),
        "big": stand_in("big", BIG_14B),
    }
    async with gateway(fleet_settings(profiles)) as gw:
        await gw.wait_ready("coder")
        response = await _ask(gw, "big")
        coder = gw.manager.engine("coder")
        assert coder is not None
        assert coder.serves
    assert response.status_code == 503, response.text
    assert response.json()["error"]["code"] == "no_room"
    assert "pinned" in response.json()["error"]["message"]


async def test_victims_sleep_their_residual_is_counted_and_they_wake() -> None:
    profiles = {
        "coder": stand_in("coder", CODER_7B, "--wake-delay-s", "0.2", sleep_level=1),
        "big": stand_in("big", BIG_14B),
    }
    async with gateway(fleet_settings(profiles)) as gw:
        await gw.wait_ready("coder")
        coder = gw.manager.engine("coder")
        assert coder is not None
        assert coder.handle is not None
        pid = coder.handle.id
        assert (await _ask(gw, "big")).status_code == 200
        # The coder sleeps beside the 14B: only its residual stays in the ledger.
        assert coder.state.value == "asleep"
        ledger = gw.manager.ledger()
        coder_claim = ledger.get("coder")
        assert coder_claim is not None
        assert coder_claim.asleep
        assert coder_claim.held_per_gpu == int(1.5 * GIB)
        assert await _simulated_memory(gw, "coder") == int(1.5 * GIB)
        assert gw.manager.evictions.get("placement_sleep") == 1
        # Asking for the coder wakes it (the same process), stopping the 14B on its GPU.
        back = await _ask(gw, "coder")
        assert back.status_code == 200, back.text
        assert coder.handle is not None
        assert coder.handle.id == pid
        assert coder.last_wake_s is not None
        big = gw.manager.engine("big")
        assert big is not None
        assert big.state.value == "idle"


SLOW_LOAD = ("--startup-delay", "1.5")


async def test_alternating_models_that_cannot_share_swap_a_bounded_number_of_times() -> None:
    profiles = {
        # Loads take 1.5 s (a real one takes tens of seconds): requests for both models
        # queue up during each, as they would on a GPU box.
        "coder": stand_in("coder", CODER_7B, *SLOW_LOAD, "--tokens-per-second", "20"),
        "big": stand_in("big", BIG_14B, *SLOW_LOAD, "--tokens-per-second", "20"),
    }
    settings = fleet_settings(profiles, SWAP_MAX_WAIT_S=2.0)
    async with gateway(settings) as gw:
        await gw.wait_ready("coder")
        jobs_before = len(gw.manager.jobs())

        async def later(delay: float, model: str) -> httpx.Response:
            await asyncio.sleep(delay)
            return await _ask(gw, model, 8)

        started = time.monotonic()
        # A, B, A, B ...: 24 requests over 4.8 s, each ~0.4 s of tokens.
        models = ["coder", "big"] * 12
        async with ledger_watch(gw) as peaks:
            answers = await asyncio.gather(*(later(i * 0.2, m) for i, m in enumerate(models)))
        elapsed = time.monotonic() - started
        loads = [
            job
            for job in gw.manager.jobs()[jobs_before:]
            if job.kind.value in ("load", "wake", "switch")
        ]
    assert [a.status_code for a in answers] == [200] * 24, [a.text for a in answers]
    assert [a.json()["model"] for a in answers] == models
    # One swap per request would be 23. Requests for the resident model go first (a swap
    # waits while the resident model has requests in flight or queued, up to SWAP_MAX_WAIT_S),
    # and the traffic outlasts the bound, so the fleet swaps back at least once; it swaps
    # without waiting only when the resident model's queue is empty.
    swaps = [(j.profile_id, j.kind.value) for j in loads]
    assert 2 <= len(loads) <= len(models) // 4, (swaps, elapsed)
    assert all(peak <= GPU_BYTES for peak in peaks.values()), peaks


async def test_switching_the_default_under_load_fails_no_request(three: Gateway) -> None:
    gw = three
    await gw.wait_ready("coder")
    stop = asyncio.Event()
    statuses: list[int] = []

    async def load() -> None:
        while not stop.is_set():
            response = await _ask(gw, "current", 5)
            statuses.append(response.status_code)

    clients = [asyncio.create_task(load()) for _ in range(4)]
    try:
        for body in ({"profile_id": "chat"}, {"profile_id": "coder", "exclusive": True}):
            accepted = await gw.http.post("/api/models/switch", json=body, headers=AUTH)
            assert accepted.status_code == 202, accepted.text
            job_id = accepted.json()["job_id"]
            job = await gw.manager.wait_job(job_id, timeout_s=60)
            assert job.status.value == "succeeded", job.error
            await eventually(lambda: len(statuses) > 10, 30)
    finally:
        stop.set()
        await asyncio.gather(*clients)
    assert statuses
    assert set(statuses) == {200}, statuses
    assert gw.manager.default_profile_id == "coder"
    chat = gw.manager.engine("chat")
    assert chat is not None
    assert chat.state.value == "idle"  # the exclusive switch stopped it


async def test_idle_engines_sleep_or_stop_after_their_idle_ttl() -> None:
    profiles = {
        "coder": {**stand_in("coder", CODER_7B, sleep_level=1), "idle_ttl_s": 1.0},
        "chat": {**stand_in("chat", CHAT_8B), "idle_ttl_s": 1.0},
    }
    async with gateway(fleet_settings(profiles)) as gw:
        await gw.wait_ready("coder")
        assert (await _ask(gw, "chat")).status_code == 200
        coder, chat = gw.manager.engine("coder"), gw.manager.engine("chat")
        assert coder is not None
        assert chat is not None
        # Unused past their TTL: the one with sleep mode sleeps, the other is stopped.
        await eventually(lambda: coder.state.value == "asleep", 15)
        await eventually(lambda: chat.state.value == "idle", 15)
        assert gw.manager.evictions.get("idle_sleep") == 1
        assert gw.manager.evictions.get("idle_stop") == 1
        # A request wakes the sleeper.
        woken = await _ask(gw, "coder")
        assert woken.status_code == 200, woken.text
        assert coder.last_wake_s is not None


async def test_a_model_that_never_fits_is_a_404_naming_why() -> None:
    profiles = {
        "coder": stand_in("coder", CODER_7B),
        "huge": {
            **stand_in("huge", {**BIG_14B, "params_b": 140.0}),
            "vllm": {"max_model_len": 8192},
        },
    }
    async with gateway(fleet_settings(profiles)) as gw:
        await gw.wait_ready("coder")
        response = await _ask(gw, "huge")
        assert gw.manager.engine("huge") is None  # nothing was started or evicted for it
        coder = gw.manager.engine("coder")
        assert coder is not None
        assert coder.serves
    assert response.status_code == 404, response.text
    error = response.json()["error"]
    assert error["code"] == "profile_does_not_fit"
    assert error["param"] == "model"
    assert "cannot run on this hardware" in error["message"]
    assert "GiB" in error["message"]  # the planner's numbers


async def test_models_swapped_in_serve_their_waiters_before_being_swapped_out() -> None:
    """Two models that cannot share, one engine's load longer than SWAP_MAX_WAIT_S, and a
    burst for both at once: every request is served (each model gets its turn once it is
    ready), instead of the two swapping back and forth while their waiters starve."""
    profiles = {
        "coder": stand_in("coder", CODER_7B, "--startup-delay", "1"),
        "big": stand_in("big", BIG_14B, "--startup-delay", "1"),
    }
    settings = fleet_settings(profiles, SWAP_MAX_WAIT_S=0.3, MAX_QUEUE_SIZE=2)
    async with gateway(settings) as gw:
        await gw.wait_ready("coder")
        jobs_before = len(gw.manager.jobs())
        models = ["big", "coder"] * 6
        async with ledger_watch(gw) as peaks:
            answers = await asyncio.wait_for(
                asyncio.gather(*(_ask(gw, m, 4) for m in models)), timeout=60
            )
        loads = [j for j in gw.manager.jobs()[jobs_before:] if j.kind.value == "load"]
    assert [a.status_code for a in answers] == [200] * 12, [a.text for a in answers]
    assert [a.json()["model"] for a in answers] == models
    assert len(loads) <= 4, [(j.profile_id, j.status.value) for j in loads]
    assert all(peak <= GPU_BYTES for peak in peaks.values()), peaks


async def test_a_wake_waits_for_room_and_never_over_claims_a_gpu() -> None:
    """The coder sleeps beside a busy 14B on the same GPUs: asking for the coder waits for the
    14B's request (no thrash, then a drain) before the coder wakes, never both holding a GPU."""
    profiles = {
        "coder": stand_in("coder", CODER_7B, sleep_level=1),
        "big": stand_in("big", BIG_14B),
    }
    async with gateway(fleet_settings(profiles, SWAP_MAX_WAIT_S=0.5)) as gw:
        await gw.wait_ready("coder")
        assert (await _ask(gw, "big")).status_code == 200
        coder, big = gw.manager.engine("coder"), gw.manager.engine("big")
        assert coder is not None
        assert big is not None
        assert coder.state.value == "asleep"
        async with ledger_watch(gw) as peaks:
            # A request in flight on the 14B for 1.5 s (its slot, held as the proxy holds it).
            assert big.acquire_slot()

            async def finish() -> None:
                await asyncio.sleep(1.5)
                big.release_slot()

            finishing = asyncio.create_task(finish())
            asked = time.monotonic()
            woken = await _ask(gw, "coder")
            waited = time.monotonic() - asked
            await finishing
        assert big.state.value == "idle"
    assert woken.status_code == 200, woken.text
    assert coder.last_wake_s is not None
    # Served only once the 14B's request was done (it was drained, not cut off).
    assert waited >= 1.4
    assert all(peak <= GPU_BYTES for peak in peaks.values()), peaks


async def test_local_slots_per_engine() -> None:
    """A profile's max_concurrency is its engine's slots; a vLLM engine (which batches) gets
    VLLM_DEFAULT_SLOTS without it, unless MAX_QUEUE_SIZE was set; other engines get
    MAX_QUEUE_SIZE (default 4)."""
    shipped = yaml.safe_load((REPO / "model_profiles.yml").read_text())["profiles"]
    profiles = {
        "coder": stand_in("coder", CODER_7B),
        "batching": copy.deepcopy(shipped["tiny-cpu"]),
        "capped": {**copy.deepcopy(shipped["tiny-cpu"]), "max_concurrency": 12},
    }
    profiles["capped"]["served_model_name"] = "capped"
    async with gateway(fleet_settings(profiles)) as gw:
        scheduler = gw.app.state.resources.scheduler
        default_slots = [scheduler.slots(p) for p in ("coder", "batching", "capped")]
    async with gateway(fleet_settings(profiles, MAX_QUEUE_SIZE=6)) as gw:
        scheduler = gw.app.state.resources.scheduler
        set_slots = [scheduler.slots(p) for p in ("coder", "batching", "capped")]
    assert default_slots == [4, VLLM_DEFAULT_SLOTS, 12]
    assert set_slots == [6, 6, 12]


async def test_three_models_one_at_a_time_never_evict_an_engine_still_loading() -> None:
    """One engine at a time, three models, loads that outlast the swap bound, a burst for all
    three: a load requested while another engine is still loading waits for that engine's turn,
    so every request is served (an eviction queued behind a load used to stop each engine the
    moment it became ready, serving nobody)."""
    profiles = {
        name: stand_in(name, arch, "--startup-delay", "1")
        for name, arch in (("coder", CODER_7B), ("chat", CHAT_8B), ("big", BIG_14B))
    }
    settings = fleet_settings(profiles, SWAP_MAX_WAIT_S=0.3, FLEET_MAX_ENGINES=1)
    async with gateway(settings) as gw:
        await gw.wait_ready("coder")
        models = ["chat", "big", "coder"] * 4
        answers = await asyncio.wait_for(
            asyncio.gather(*(_ask(gw, m, 4) for m in models)), timeout=90
        )
    assert [a.status_code for a in answers] == [200] * 12, [a.text for a in answers]
    assert [a.json()["model"] for a in answers] == models
