"""VRAM planner verdicts on the recorded dual RTX 3090 snapshot, checked against hand arithmetic.

The numbers each case expects are written out below from the profile's architecture, so a
change in the planner's formula or constants shows up as a failing line with the arithmetic
next to it. Common facts:

    one RTX 3090          = 24576 MiB = 25,769,803,776 bytes total
    budget (0.90 x total) = floor(0.9 x 25,769,803,776) = 23,192,823,398 bytes (21.6 GiB)
    overhead per GPU      = 2 GiB = 2,147,483,648 bytes
    snapshot free memory  : GPU 0 25,371,344,896 (Xorg, gnome-shell), GPU 1 25,755,123,712
"""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest

from orchestrator.gpus import GpuInventory, GpuProcess, SnapshotReader
from orchestrator.planner import (
    Fit,
    FitVerdict,
    kv_bytes_per_token,
    kv_heads_per_gpu,
    plan_all,
    plan_profile,
    recommend,
)
from orchestrator.profiles import Profile, ProfileSet, load_profiles
from tests.helpers.paths import REPO

SNAPSHOT = REPO / "tests" / "fixtures" / "gpu" / "dual_rtx3090.json"
SHIPPED = REPO / "model_profiles.yml"

GIB = 1024**3
TOTAL = 24576 * 1024 * 1024
BUDGET = math.floor(0.9 * TOTAL)
OVERHEAD = 2 * GIB


@pytest.fixture(scope="module")
def dual_3090() -> GpuInventory:
    """The recorded dual RTX 3090 inventory."""
    return SnapshotReader(SNAPSHOT).read()


@pytest.fixture(scope="module")
def shipped() -> ProfileSet:
    """The shipped model_profiles.yml."""
    return load_profiles(SHIPPED)


def with_vllm(profile: Profile, **changes: object) -> Profile:
    """The profile with some vllm arguments changed (validated again)."""
    vllm = profile.vllm.model_dump() | changes
    return Profile.model_validate(profile.model_dump() | {"vllm": vllm})


def test_snapshot_budget_is_what_the_table_assumes(dual_3090: GpuInventory) -> None:
    assert [gpu.memory_total_bytes for gpu in dual_3090.gpus] == [TOTAL, TOTAL]
    assert BUDGET == 23_192_823_398


def test_7b_bf16_fits_on_one_gpu(shipped: ProfileSet, dual_3090: GpuInventory) -> None:
    # Qwen2-7B-Instruct, bf16, max_model_len 32768:
    weights = 7.616e9 * 2  # 15,232,000,000
    kv_per_token = 2 * 28 * 4 * 128 * 2  # K+V x layers x kv_heads x head_dim x 2 bytes = 57,344
    kv = kv_per_token * 32768  # 1,879,048,192 (1.75 GiB)
    required = weights + kv + OVERHEAD  # 19,258,531,840 <= 23,192,823,398
    verdict = plan_profile(shipped.get("qwen2-7b"), dual_3090)
    assert verdict.fit is Fit.FITS
    assert verdict.tensor_parallel_size == 1
    assert verdict.gpu_ids == (1,)  # the GPU with the most free memory (no desktop on it)
    assert verdict.max_model_len == 32768
    assert verdict.weights_bytes == weights
    assert verdict.kv_bytes_per_token == kv_per_token
    assert verdict.kv_bytes == kv
    assert verdict.overhead_bytes == OVERHEAD
    assert verdict.per_gpu_required_bytes == required
    assert verdict.per_gpu_budget_bytes == BUDGET
    assert verdict.per_gpu_free_bytes == 25_755_123_712
    assert any("fits with tensor_parallel_size 1 on GPU 1" in r for r in verdict.reasons)


def test_14b_bf16_needs_both_gpus(shipped: ProfileSet, dual_3090: GpuInventory) -> None:
    # DeepSeek-R1-Distill-Qwen-14B, bf16, max_model_len 32768:
    weights = 14.77e9 * 2  # 29,540,000,000: more than one GPU's budget on its own
    assert weights > BUDGET
    # TP=2: each GPU holds half the weights and 8 / 2 = 4 of the KV heads.
    kv_per_token_per_gpu = 2 * 48 * 4 * 128 * 2  # 98,304
    required = weights / 2 + kv_per_token_per_gpu * 32768 + OVERHEAD  # 20,138,709,120
    verdict = plan_profile(shipped.get("deepseek-r1-distill-14b"), dual_3090)
    assert verdict.fit is Fit.FITS
    assert verdict.tensor_parallel_size == 2
    assert verdict.gpu_ids == (0, 1)
    assert verdict.max_model_len == 32768
    assert verdict.kv_bytes_per_token == 2 * 48 * 8 * 128 * 2  # whole model: 196,608
    assert verdict.per_gpu_required_bytes == required
    assert verdict.reasons[0].startswith("tensor_parallel_size 1: needs 35.51 GiB per GPU")


def test_70b_bf16_does_not_fit(shipped: ProfileSet, dual_3090: GpuInventory) -> None:
    # Llama-3-70B-Instruct, bf16: 70.554e9 x 2 = 141,108,000,000 bytes of weights;
    # even split in two, 70,554,000,000 per GPU is three times the budget.
    verdict = plan_profile(shipped.get("llama-3-70b"), dual_3090)
    assert verdict.fit is Fit.DOES_NOT_FIT
    assert not verdict.fits
    assert verdict.weights_bytes == 141_108_000_000
    assert verdict.tensor_parallel_size == 2  # the widest split is the one described
    assert verdict.gpu_ids == ()
    assert "the weights alone take 65.71 GiB per GPU" in verdict.reasons[-1]
    assert "a quantized variant may fit" in verdict.reasons[-1]


def test_70b_awq_fits_on_two_gpus_only_with_a_reduced_context(
    shipped: ProfileSet, dual_3090: GpuInventory
) -> None:
    # casperhansen/llama-3-70b-instruct-awq: 4-bit at 0.5625 bytes per parameter.
    weights = 39_686_625_000  # 70.554e9 x 0.5625
    weights_per_gpu = math.ceil(weights / 2)  # 19,843,312,500
    kv_per_token_per_gpu = 2 * 80 * (8 // 2) * 128 * 2  # fp16 KV: 163,840
    full = weights_per_gpu + kv_per_token_per_gpu * 8192 + OVERHEAD  # 23,332,973,428
    assert full > BUDGET  # the model's whole 8K context does not fit ...
    room = BUDGET - weights_per_gpu - OVERHEAD  # 1,202,027,250 bytes for KV cache
    tokens = room // kv_per_token_per_gpu  # 7,336
    reduced = tokens // 256 * 256  # ... but 7,168 tokens do
    assert reduced == 7168
    verdict = plan_profile(shipped.get("llama-3-70b-awq"), dual_3090)
    assert verdict.fit is Fit.FITS_REDUCED_CONTEXT
    assert verdict.fits
    assert verdict.tensor_parallel_size == 2
    assert verdict.gpu_ids == (0, 1)
    assert verdict.max_model_len == reduced
    assert verdict.requested_max_model_len == 8192
    assert verdict.weights_bytes == weights
    assert verdict.per_gpu_required_bytes == weights_per_gpu + kv_per_token_per_gpu * 7168 + (
        OVERHEAD
    )
    assert any("max_model_len 8192 does not fit; 7168 tokens do" in r for r in verdict.reasons)


def test_33b_fits_only_quantized(shipped: ProfileSet, dual_3090: GpuInventory) -> None:
    # bf16: 33.343e9 x 2 / 2 GPUs = 33,343,000,000 per GPU > budget.
    assert plan_profile(shipped.get("deepseek-coder-33b"), dual_3090).fit is Fit.DOES_NOT_FIT
    # AWQ: 33.343e9 x 0.5625 / 2 = 9,377,718,750 per GPU + KV (62 layers, 4 of 8 KV heads
    # per GPU) 2 x 62 x 4 x 128 x 2 x 16384 = 2,080,374,784 + 2 GiB = 13,605,577,182 per GPU;
    # on one GPU 18,755,437,500 + 4,160,749,568 + 2 GiB is over the budget.
    verdict = plan_profile(shipped.get("deepseek-coder-33b-awq"), dual_3090)
    assert verdict.fit is Fit.FITS
    assert verdict.tensor_parallel_size == 2
    assert verdict.per_gpu_required_bytes == 9_377_718_750 + 2_080_374_784 + OVERHEAD


def test_context_too_small_to_be_useful_does_not_fit(
    shipped: ProfileSet, dual_3090: GpuInventory
) -> None:
    # At utilization 0.86 the budget is floor(0.86 x TOTAL) = 22,162,031,247: after weights
    # (19,843,312,500) and overhead only 171,235,099 bytes = 1,045 tokens of KV cache remain,
    # under the 2,048-token floor for a reduced context.
    profile = with_vllm(shipped.get("llama-3-70b-awq"), gpu_memory_utilization=0.86)
    verdict = plan_profile(profile, dual_3090)
    assert verdict.fit is Fit.DOES_NOT_FIT
    assert "even a 2048-token context" in verdict.reasons[-1]
    assert "1045 tokens" in verdict.reasons[-1]


def test_pinned_tensor_parallel_size_is_the_only_one_tried(
    shipped: ProfileSet, dual_3090: GpuInventory
) -> None:
    profile = with_vllm(shipped.get("qwen2-7b"), tensor_parallel_size=2)
    verdict = plan_profile(profile, dual_3090)
    assert verdict.fit is Fit.FITS
    assert verdict.tensor_parallel_size == 2  # TP=1 would fit too, but the profile pins 2
    assert verdict.gpu_ids == (0, 1)


def test_pinned_tensor_parallel_size_that_does_not_divide_the_heads_is_refused(
    shipped: ProfileSet, dual_3090: GpuInventory
) -> None:
    # Qwen2-7B has 28 attention heads; 8 does not divide them (28 % 8 == 4).
    profile = with_vllm(shipped.get("qwen2-7b"), tensor_parallel_size=8)
    verdict = plan_profile(profile, dual_3090)
    assert verdict.fit is Fit.DOES_NOT_FIT
    assert verdict.reasons == (
        "tensor_parallel_size 8 does not divide the model's 28 attention heads "
        "(vLLM requires attention_heads % tensor_parallel_size == 0)",
    )


def test_pinned_tensor_parallel_size_beyond_the_gpus_is_refused(
    shipped: ProfileSet, dual_3090: GpuInventory
) -> None:
    profile = with_vllm(shipped.get("llama-3-70b-awq"), tensor_parallel_size=4)
    verdict = plan_profile(profile, dual_3090)
    assert verdict.fit is Fit.DOES_NOT_FIT
    assert verdict.reasons == ("tensor_parallel_size 4 needs 4 GPUs; 2 found",)


def test_auto_tensor_parallel_skips_sizes_the_heads_do_not_allow(
    shipped: ProfileSet, dual_3090: GpuInventory
) -> None:
    # Eight idle 3090s. Qwen2-7B's 28 heads allow TP 1, 2 and 4 but not 8 (28 % 8 == 4); the
    # 14B (40 heads) needs two GPUs at 32K context but fits on 2 of the 8.
    eight = replace(dual_3090, gpus=tuple(replace(dual_3090.gpus[1], index=i) for i in range(8)))
    small = plan_profile(shipped.get("qwen2-7b"), eight)
    assert (small.fit, small.tensor_parallel_size, small.gpu_ids) == (Fit.FITS, 1, (0,))
    assert not any("tensor_parallel_size 8" in r for r in small.reasons)  # irrelevant to a fit
    big = plan_profile(shipped.get("qwen2-14b"), eight)
    assert (big.fit, big.tensor_parallel_size, big.gpu_ids) == (Fit.FITS, 2, (0, 1))


def test_zero_gpus_does_not_fit_and_says_why(shipped: ProfileSet) -> None:
    none = GpuInventory(gpus=(), source="nvml", reason="NVML unavailable: Driver Not Loaded")
    verdict = plan_profile(shipped.get("llama-3-8b"), none)
    assert verdict.fit is Fit.DOES_NOT_FIT
    assert verdict.reasons == ("no GPU available: NVML unavailable: Driver Not Loaded",)
    assert verdict.gpu_ids == ()


@pytest.mark.parametrize("profile_id", ["simulator", "tiny-cpu"])
def test_profiles_without_a_gpu_fit_anywhere(shipped: ProfileSet, profile_id: str) -> None:
    none = GpuInventory(gpus=(), source="nvml", reason="NVML unavailable")
    verdict = plan_profile(shipped.get(profile_id), none)
    assert verdict.fit is Fit.FITS
    assert not verdict.uses_gpu
    assert verdict.gpu_ids == ()
    assert verdict.reasons[0].startswith("runs without a GPU")


def test_memory_held_by_other_processes_is_a_warning(
    shipped: ProfileSet, dual_3090: GpuInventory
) -> None:
    # Another program holds 8 GiB on GPU 0: free 16 GiB is under the 21.6 GiB budget.
    busy_gpu = replace(
        dual_3090.gpus[0],
        memory_used_bytes=8 * GIB,
        memory_free_bytes=TOTAL - 8 * GIB,
        processes=(GpuProcess(pid=4242, used_memory_bytes=8 * GIB, name="python3"),),
    )
    busy = replace(dual_3090, gpus=(busy_gpu, dual_3090.gpus[1]))
    verdict = plan_profile(shipped.get("deepseek-r1-distill-14b"), busy)
    assert verdict.fit is Fit.FITS  # vLLM budgets from total memory, as the planner does
    assert verdict.per_gpu_free_bytes == TOTAL - 8 * GIB
    warnings = [r for r in verdict.reasons if r.startswith("warning:")]
    assert len(warnings) == 1
    assert warnings[0].startswith("warning: GPU 0 has 16.00 GiB free, less than the 21.60 GiB")
    assert "pid 4242 python3" in warnings[0]
    # A one-GPU model goes to the idle GPU and gets no warning.
    single = plan_profile(shipped.get("llama-3-8b"), busy)
    assert single.gpu_ids == (1,)
    assert not any(r.startswith("warning:") for r in single.reasons)


def test_kv_heads_are_shared_or_replicated_across_gpus() -> None:
    assert kv_heads_per_gpu(8, 2) == 4
    assert kv_heads_per_gpu(4, 8) == 1  # fewer KV heads than GPUs: each GPU keeps one copy


def test_fp8_kv_cache_halves_the_bytes_per_token(shipped: ProfileSet) -> None:
    arch = shipped.get("llama-3-8b").architecture
    assert arch is not None
    assert kv_bytes_per_token(arch, 2) == 2 * 32 * 8 * 128 * 2
    assert kv_bytes_per_token(arch, 1) == 2 * 32 * 8 * 128 * 1
    fp8 = with_vllm(shipped.get("llama-3-70b-awq"), kv_cache_dtype="fp8")
    # With an fp8 cache the whole 8K context fits: 163,840 / 2 x 8192 = 671,088,640 bytes.
    verdict = plan_profile(fp8, SnapshotReader(SNAPSHOT).read())
    assert verdict.fit is Fit.FITS
    assert verdict.max_model_len == 8192


def test_shipped_table_on_the_dual_3090(shipped: ProfileSet, dual_3090: GpuInventory) -> None:
    table = {
        pid: (v.fit.value, v.tensor_parallel_size, v.max_model_len)
        for pid, v in plan_all(shipped, dual_3090).items()
    }
    assert table == {
        "deepseek-r1-distill-14b": ("fits", 2, 32768),
        "deepseek-coder-7b": ("fits", 2, 16384),  # MHA: 512 KiB of KV per token
        "deepseek-coder-33b": ("does_not_fit", 2, 16384),
        "deepseek-coder-33b-awq": ("fits", 2, 16384),
        "qwen2-7b": ("fits", 1, 32768),
        "qwen2-14b": ("fits", 2, 32768),
        "llama-3-8b": ("fits", 1, 8192),
        "llama-3-70b": ("does_not_fit", 2, 8192),
        "llama-3-70b-awq": ("fits_reduced_context", 2, 7168),
        "phi-3-mini": ("fits", 1, 4096),
        "codellama-7b": ("fits", 2, 16384),
        "tiny-cpu": ("fits", 1, 256),
        "simulator": ("fits", 1, None),
        # GGUF files at Q4_K_M on llama.cpp: each fits one 3090 with its whole context.
        "qwen2.5-7b-gguf": ("fits", 1, 32768),
        "llama3-8b": ("fits", 1, 8192),
        "deepseek-r1-distill-14b-gguf": ("fits", 1, 32768),
        "tiny-gguf": ("fits", 1, 256),
    }


def test_recommendations_put_the_default_first_and_leave_out_what_does_not_fit(
    shipped: ProfileSet, dual_3090: GpuInventory
) -> None:
    ids = [v.profile_id for v in recommend(shipped, dual_3090)]
    assert ids[0] == "deepseek-r1-distill-14b"
    assert "llama-3-70b" not in ids
    assert "deepseek-coder-33b" not in ids
    # Full-context GPU profiles, largest first, then reduced context, then no GPU.
    assert ids[1] == "deepseek-coder-33b-awq"
    assert ids.index("phi-3-mini") < ids.index("llama-3-70b-awq") < ids.index("tiny-cpu")
    assert ids[-3:] == ["tiny-cpu", "tiny-gguf", "simulator"]


def test_verdict_serializes_to_json(shipped: ProfileSet, dual_3090: GpuInventory) -> None:
    verdict: FitVerdict = plan_profile(shipped.get("llama-3-70b-awq"), dual_3090)
    data = json.loads(json.dumps(verdict.to_dict()))
    assert data["fit"] == "fits_reduced_context"
    assert data["gpu_ids"] == [0, 1]
    assert data["max_model_len"] == 7168
