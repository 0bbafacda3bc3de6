"""Placement on the recorded dual-RTX-3090 snapshot, with tables written out by hand.

The snapshot: two GPUs of 24 GiB (25,769,803,776 bytes); GPU 0 has 380 MiB in use by the
desktop (Xorg, gnome-shell and the driver), GPU 1 14 MiB. What a new engine may claim on a GPU
is its total less what others hold less the 10 % reserve:

    GPU 0: 24 - 0.371 - 2.4 = 21.23 GiB        GPU 1: 24 - 0.0137 - 2.4 = 21.59 GiB

Claims (the planner's estimate: weights/tp + KV cache for the context + 2 GiB overhead):

| profile      | weights (bf16) | context | tp | per GPU   | gpu_memory_utilization |
|--------------|----------------|---------|----|-----------|------------------------|
| qwen2-7b     | 15.23 GB       | 32768   | 1  | 17.94 GiB | 0.748                  |
| llama-3-8b   | 16.06 GB       | 8192    | 1  | 17.96 GiB | 0.749                  |
| phi-3-mini   | 7.64 GB        | 4096    | 1  | 10.62 GiB | 0.443                  |
| qwen2-14b    | 29.54 GB       | 32768   | 2  | 18.76 GiB | 0.782 (35.51 GiB at tp 1) |
"""

from __future__ import annotations

import dataclasses

import pytest

from orchestrator.gpus import GpuInventory, SnapshotReader
from orchestrator.placement import (
    GIB,
    Claim,
    Ledger,
    Placement,
    available,
    check_ledger,
    choose_victims,
    claim_for,
    place,
    sleep_level_for,
    start_problem,
    utilization_for,
)
from orchestrator.profiles import ProfileSet, load_profiles
from tests.helpers.paths import DUAL_3090_SNAPSHOT, REPO


@pytest.fixture(scope="module")
def gpus() -> GpuInventory:
    return SnapshotReader(DUAL_3090_SNAPSHOT).read()


@pytest.fixture(scope="module")
def profiles() -> ProfileSet:
    return load_profiles(REPO / "model_profiles.yml")


def _row(placement: Placement) -> tuple[tuple[int, ...], int, int, float, float]:
    return (
        placement.gpu_ids,
        placement.tensor_parallel_size,
        placement.max_model_len,
        round(placement.bytes_per_gpu / GIB, 2),
        placement.utilization,
    )


def _resident(placement: Placement, engine_id: str, last_used: float, **extra: object) -> Claim:
    return dataclasses.replace(
        Claim(engine_id, placement.gpu_ids, placement.bytes_per_gpu, last_used=last_used),
        **extra,  # type: ignore[arg-type]
    )


def test_room_left_on_each_gpu_of_the_snapshot(gpus: GpuInventory) -> None:
    assert [round(available(gpu, Ledger()) / GIB, 2) for gpu in gpus.gpus] == [21.23, 21.59]


@pytest.mark.parametrize(
    ("profile_id", "row"),
    [
        ("qwen2-7b", ((1,), 1, 32768, 17.94, 0.748)),
        ("llama-3-8b", ((1,), 1, 8192, 17.96, 0.749)),
        ("phi-3-mini", ((1,), 1, 4096, 10.62, 0.443)),
        # 35.51 GiB at tp 1: the smallest set where it fits is both GPUs.
        ("qwen2-14b", ((0, 1), 2, 32768, 18.76, 0.782)),
    ],
)
def test_an_engine_alone_gets_the_smallest_set_with_the_most_room(
    gpus: GpuInventory, profiles: ProfileSet, profile_id: str, row: tuple[object, ...]
) -> None:
    assert _row(place(profiles.get(profile_id), gpus, Ledger())) == row


def test_a_7b_and_an_8b_are_resident_on_different_gpus_at_once(
    gpus: GpuInventory, profiles: ProfileSet
) -> None:
    coder = place(profiles.get("qwen2-7b"), gpus, Ledger())
    ledger = Ledger((claim_for(coder, profiles.get("qwen2-7b"), last_used=1.0),))
    chat = place(profiles.get("llama-3-8b"), gpus, ledger)
    assert _row(coder) == ((1,), 1, 32768, 17.94, 0.748)
    assert _row(chat) == ((0,), 1, 8192, 17.96, 0.749)
    both = ledger.with_claim(claim_for(chat, profiles.get("llama-3-8b"), last_used=2.0))
    # What is left: 21.23 - 17.96 = 3.27 GiB on GPU 0, 21.59 - 17.94 = 3.65 GiB on GPU 1.
    assert [round(available(gpu, both) / GIB, 2) for gpu in gpus.gpus] == [3.27, 3.65]


def test_a_14b_then_needs_both_gpus_and_evicts_both(
    gpus: GpuInventory, profiles: ProfileSet
) -> None:
    coder = place(profiles.get("qwen2-7b"), gpus, Ledger())
    chat = place(profiles.get("llama-3-8b"), gpus, Ledger((_resident(coder, "qwen2-7b", 1.0),)))
    ledger = Ledger((_resident(coder, "qwen2-7b", 1.0), _resident(chat, "llama-3-8b", 2.0)))
    assert not place(profiles.get("qwen2-14b"), gpus, ledger).placed
    eviction = choose_victims(profiles.get("qwen2-14b"), gpus, ledger)
    assert eviction is not None
    assert set(eviction.victims) == {"qwen2-7b", "llama-3-8b"}
    assert _row(eviction.placement) == ((0, 1), 2, 32768, 18.76, 0.782)


def test_a_pinned_engine_is_never_a_victim(gpus: GpuInventory, profiles: ProfileSet) -> None:
    coder = place(profiles.get("qwen2-7b"), gpus, Ledger())
    chat = place(profiles.get("llama-3-8b"), gpus, Ledger((_resident(coder, "qwen2-7b", 1.0),)))
    ledger = Ledger(
        (_resident(coder, "qwen2-7b", 1.0, pinned=True), _resident(chat, "llama-3-8b", 2.0))
    )
    # The 14B needs both GPUs and the coder may not leave one: no eviction makes it fit.
    assert choose_victims(profiles.get("qwen2-14b"), gpus, ledger) is None
    # An engine in use that the caller cannot drain in time is not a victim either.
    alone = ledger.without("qwen2-7b")
    assert choose_victims(profiles.get("qwen2-14b"), gpus, alone, busy=["llama-3-8b"]) is None
    assert choose_victims(profiles.get("qwen2-14b"), gpus, alone) is not None


def test_victims_are_the_least_recently_used_smallest_set(
    gpus: GpuInventory, profiles: ProfileSet
) -> None:
    phi = Claim("phi-3-mini", (0,), round(10.62 * GIB), last_used=10.0)
    coder = Claim("qwen2-7b", (1,), round(17.94 * GIB), last_used=5.0)
    # The 8B (17.96 GiB) fits on neither GPU as they are (10.61 and 3.65 GiB left); removing
    # either engine is enough, and the coder was used longest ago.
    eviction = choose_victims(profiles.get("llama-3-8b"), gpus, Ledger((phi, coder)))
    assert eviction is not None
    assert eviction.victims == ("qwen2-7b",)
    assert eviction.placement.gpu_ids == (1,)
    pinned = Ledger((phi, dataclasses.replace(coder, pinned=True)))
    eviction = choose_victims(profiles.get("llama-3-8b"), gpus, pinned)
    assert eviction is not None
    assert eviction.victims == ("phi-3-mini",)
    assert eviction.placement.gpu_ids == (0,)
    # Priority beats recency: a high-priority engine used long ago stays.
    prioritized = Ledger((phi, dataclasses.replace(coder, priority=10)))
    eviction = choose_victims(profiles.get("llama-3-8b"), gpus, prioritized)
    assert eviction is not None
    assert eviction.victims == ("phi-3-mini",)


def test_a_sleeping_engines_residual_is_counted(gpus: GpuInventory, profiles: ProfileSet) -> None:
    # A 20 GiB engine asleep on GPU 1 still holds 4.75 GiB there (vllm#17117's level-2 figure):
    # 21.59 - 4.75 = 16.84 GiB is too little for the coder's 17.94, so it goes to GPU 0.
    sleeper = Claim("big", (1,), 20 * GIB, asleep=True, residual_bytes_per_gpu=round(4.75 * GIB))
    assert _row(place(profiles.get("qwen2-7b"), gpus, Ledger((sleeper,)))) == (
        (0,), 1, 32768, 17.94, 0.748,
    )  # fmt: skip
    # Counted as nothing (residual 0), GPU 1 would have had the most room.
    weightless = dataclasses.replace(sleeper, residual_bytes_per_gpu=0)
    assert place(profiles.get("qwen2-7b"), gpus, Ledger((weightless,))).gpu_ids == (1,)
    # Asleep, the coder on GPU 1 keeps its residual: the 14B then only evicts the 8B on GPU 0.
    coder = Claim("qwen2-7b", (1,), round(17.94 * GIB), last_used=1.0)
    chat = Claim("llama-3-8b", (0,), round(17.96 * GIB), last_used=2.0)
    ledger = Ledger((coder, chat)).asleep("qwen2-7b")
    assert round(ledger.held_on(1) / GIB, 2) == 1.5
    eviction = choose_victims(profiles.get("qwen2-14b"), gpus, ledger)
    assert eviction is not None
    assert eviction.victims == ("llama-3-8b",)


def test_a_wider_split_at_full_context_beats_a_reduced_context(
    gpus: GpuInventory, profiles: ProfileSet
) -> None:
    # Another engine claims 6 GiB on both GPUs: the coder's 17.94 GiB fits on neither alone,
    # but at tp 2 it needs 9.97 GiB per GPU with its whole 32768-token context.
    ledger = Ledger((Claim("x", (0, 1), 6 * GIB),))
    placement = place(profiles.get("qwen2-7b"), gpus, ledger)
    assert _row(placement) == ((0, 1), 2, 32768, 9.97, 0.416)
    assert not placement.reduced_context


def test_a_reduced_context_says_so_and_can_be_refused(
    gpus: GpuInventory, profiles: ProfileSet
) -> None:
    ledger = Ledger((Claim("x", (0, 1), 12 * GIB),))
    placement = place(profiles.get("qwen2-7b"), gpus, ledger)
    assert _row(placement) == ((0, 1), 2, 4864, 9.22, 0.385)
    assert placement.reduced_context
    assert "max_model_len 32768 fits nowhere beside the resident engines; 4864 tokens do" in (
        placement.reasons
    )
    strict = place(profiles.get("qwen2-7b"), gpus, ledger, allow_reduced_context=False)
    assert not strict.placed
    assert strict.reasons[-1] == "does not fit beside the resident engines"


def test_utilization_never_hands_an_engine_less_than_its_claim(gpus: GpuInventory) -> None:
    two = gpus.gpus
    for claim in (1, GIB, round(17.94 * GIB), 20 * GIB, two[0].memory_total_bytes):
        fraction = utilization_for(claim, two)
        assert fraction * two[0].memory_total_bytes >= claim
        assert fraction - 0.001 < claim / two[0].memory_total_bytes + 1e-9


def test_start_waits_for_the_memory_to_be_free(gpus: GpuInventory, profiles: ProfileSet) -> None:
    placement = place(profiles.get("qwen2-7b"), gpus, Ledger())
    assert start_problem(placement, gpus) is None
    # Another engine is still allocating on GPU 1: 10 GiB in use, so 14 GiB free < 17.95 GiB.
    busy = dataclasses.replace(
        gpus,
        gpus=tuple(
            dataclasses.replace(
                gpu,
                memory_used_bytes=10 * GIB,
                memory_free_bytes=gpu.memory_total_bytes - 10 * GIB,
            )
            if gpu.index == 1
            else gpu
            for gpu in gpus.gpus
        ),
    )
    problem = start_problem(placement, busy)
    assert problem is not None
    assert problem.startswith("GPU 1 has 14.00 GiB free")


def test_the_ledger_is_checked_against_nvml(gpus: GpuInventory) -> None:
    baseline = {gpu.index: gpu.memory_used_bytes for gpu in gpus.gpus}
    engine = Claim("qwen2-7b", (1,), 18 * GIB)
    # NVML shows the engine's 18 GiB on GPU 1: the ledger agrees.
    reading = dataclasses.replace(
        gpus,
        gpus=tuple(
            dataclasses.replace(gpu, memory_used_bytes=gpu.memory_used_bytes + 18 * GIB)
            if gpu.index == 1
            else gpu
            for gpu in gpus.gpus
        ),
    )
    assert check_ledger(Ledger((engine,)), reading, baseline_not_ours=baseline).agrees
    # Asleep, the ledger expects 1.5 GiB; NVML still shows 18 GiB (a sleep that freed nothing).
    check = check_ledger(Ledger((engine,)).asleep("qwen2-7b"), reading, baseline_not_ours=baseline)
    assert [m.gpu_id for m in check.mismatches] == [1]
    assert round(check.mismatches[0].difference / GIB, 2) == 16.5


@pytest.mark.parametrize(
    ("wanted", "host_free_gib", "level"),
    [(0, 512, 0), (1, 64, 1), (1, 8, 2), (2, 512, 2)],
)
def test_level_one_sleep_only_when_host_ram_holds_the_weights(
    wanted: int, host_free_gib: int, level: int
) -> None:
    claim = Claim("qwen2-7b", (1,), 18 * GIB, weights_bytes=round(15.23e9))
    assert sleep_level_for(claim, wanted, host_free_gib * GIB) == level
