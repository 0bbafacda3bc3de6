"""Planning across nodes (tensor parallel within a node x pipeline parallel across nodes) on two
recorded dual RTX 3090 boxes, checked against hand arithmetic.

Common facts (as in test_planner.py):

    one RTX 3090          = 24576 MiB = 25,769,803,776 bytes total
    budget (0.90 x total) = floor(0.9 x 25,769,803,776) = 23,192,823,398 bytes (21.6 GiB)
    overhead per GPU      = 2 GiB = 2,147,483,648 bytes
    snapshot free memory  : GPU 0 25,371,344,896 (Xorg, gnome-shell), GPU 1 25,755,123,712

Both boxes are the same snapshot unless a test makes one busy: with equal free memory the
node named first alphabetically comes first.
"""

from __future__ import annotations

import json
import math
from dataclasses import replace
from typing import Any

import pytest

from orchestrator.gpus import GpuInventory, SnapshotReader
from orchestrator.pipeline import plan_across_nodes
from orchestrator.planner import Fit, plan_profile
from orchestrator.profiles import (
    Profile,
    ProfileError,
    ProfileSet,
    load_profiles,
    profiles_from_data,
)
from orchestrator.specs import build_engine_spec, vllm_args
from tests.helpers.paths import DUAL_3090_SNAPSHOT, REPO

GIB = 1024**3
TOTAL = 24576 * 1024 * 1024
BUDGET = math.floor(0.9 * TOTAL)
OVERHEAD = 2 * GIB
GPU0_FREE = 25_371_344_896


@pytest.fixture(scope="module")
def shipped() -> ProfileSet:
    """The shipped model_profiles.yml."""
    return load_profiles(REPO / "model_profiles.yml")


@pytest.fixture(scope="module")
def box() -> GpuInventory:
    """One recorded dual RTX 3090 box."""
    return SnapshotReader(DUAL_3090_SNAPSHOT).read()


@pytest.fixture(scope="module")
def two_boxes(box: GpuInventory) -> dict[str, GpuInventory]:
    """Two identical dual RTX 3090 nodes."""
    return {"box-b": box, "box-a": box}


def with_vllm(profile: Profile, **changes: object) -> Profile:
    """The profile with some vllm arguments changed (validated again)."""
    vllm = profile.vllm.model_dump() | changes
    return Profile.model_validate(profile.model_dump() | {"vllm": vllm})


def busy(inventory: GpuInventory, index: int, used: int) -> GpuInventory:
    """The inventory with `used` bytes held on GPU `index` by another program."""
    gpus = tuple(
        replace(gpu, memory_used_bytes=used, memory_free_bytes=TOTAL - used)
        if gpu.index == index
        else gpu
        for gpu in inventory.gpus
    )
    return replace(inventory, gpus=gpus)


def test_a_33b_bf16_model_spans_both_boxes_as_tp2_x_pp2(
    shipped: ProfileSet, two_boxes: dict[str, GpuInventory]
) -> None:
    # deepseek-coder-33b, bf16: 33.343e9 x 2 = 66,686,000,000 bytes of weights, 62 layers,
    # 8 KV heads of 128, max_model_len 16384. Tried in order (GPUs, nodes, T):
    #   T1 x P1: 66.7 GB of weights per GPU; T2 x P1: 33.3 GB; T1 x P2 (31 layers): 33.3 GB,
    #   each over the 23.2 GB budget before any KV cache.
    #   T2 x P2: 31 layers per stage, halved per GPU:
    weights_per_gpu = 66_686_000_000 * 31 // (62 * 2)  # 16,671,500,000
    kv_per_token_per_gpu = 2 * 31 * (8 // 2) * 128 * 2  # 63,488
    required = weights_per_gpu + kv_per_token_per_gpu * 16384 + OVERHEAD  # 19,859,171,040
    assert required <= BUDGET
    profile = with_vllm(shipped.get("deepseek-coder-33b"), pipeline_parallel_size="auto")
    assert plan_profile(profile, two_boxes["box-a"]).fit is Fit.DOES_NOT_FIT  # one box is short
    verdict = plan_across_nodes(profile, two_boxes)
    assert verdict.fit is Fit.FITS
    assert (verdict.tensor_parallel_size, verdict.pipeline_parallel_size) == (2, 2)
    assert verdict.nodes == ("box-a", "box-b")  # equal free memory: by name
    assert verdict.node_gpu_ids == ((0, 1), (0, 1))
    assert verdict.gpu_ids == (0, 1)  # the first stage's
    assert verdict.max_model_len == 16384
    assert verdict.weights_bytes == 66_686_000_000
    assert verdict.kv_bytes_per_token == 2 * 62 * 8 * 128 * 2  # the whole model: 253,952
    assert verdict.per_gpu_required_bytes == required == 19_859_171_040
    assert verdict.per_gpu_budget_bytes == BUDGET
    assert verdict.per_gpu_free_bytes == GPU0_FREE
    assert verdict.reasons[:3] == (
        "tensor_parallel_size 1 on node box-a (GPU 1): needs 67.98 GiB per GPU for 16384 "
        "tokens, more than the 21.60 GiB budget (weights alone 62.11 GiB)",
        "tensor_parallel_size 2 on node box-a (GPU 0, 1): needs 34.99 GiB per GPU for 16384 "
        "tokens, more than the 21.60 GiB budget (weights alone 31.05 GiB)",
        "tensor_parallel_size 1 x pipeline_parallel_size 2 across nodes box-a, box-b (box-a "
        "GPU 1; box-b GPU 1): needs 34.99 GiB per GPU for 16384 tokens, more than the 21.60 GiB "
        "budget (weights alone 31.05 GiB)",
    )
    assert verdict.reasons[3] == (
        "fits with tensor_parallel_size 2 x pipeline_parallel_size 2 across nodes box-a, box-b "
        "(box-a GPU 0, 1; box-b GPU 0, 1): 18.50 GiB per GPU for 16384 tokens of a 21.60 GiB "
        "budget (weights 15.53 GiB + KV cache 0.97 GiB for 31 layers of a stage + overhead "
        "2.00 GiB)"
    )
    assert len(verdict.reasons) == 4  # no warning: every chosen GPU has its budget free


def test_the_same_model_with_pipeline_parallel_size_1_does_not_fit_and_names_each_node(
    shipped: ProfileSet, two_boxes: dict[str, GpuInventory]
) -> None:
    profile = shipped.get("deepseek-coder-33b")
    assert profile.vllm.pipeline_parallel_size == 1  # the default: never spans nodes
    verdict = plan_across_nodes(profile, two_boxes)
    assert verdict.fit is Fit.DOES_NOT_FIT
    assert verdict.pipeline_parallel_size == 1
    assert verdict.nodes == ()
    # Half the bf16 weights, 33,343,000,000 bytes, is over one GPU's budget on either box.
    for node in ("box-a", "box-b"):
        assert (
            f"{node}: does not fit: with tensor_parallel_size 2 the weights alone take 31.05 GiB "
            "per GPU, plus 2.00 GiB overhead, over the 21.60 GiB budget; a quantized variant may "
            "fit"
        ) in verdict.reasons
    assert [r.split(":")[0] for r in verdict.reasons[:-1]] == ["box-a"] * 3 + ["box-b"] * 3
    assert verdict.reasons[-1].startswith("pipeline_parallel_size 1: the engine never spans nodes")


def test_a_full_context_across_nodes_is_preferred_to_a_reduced_one_on_one_node(
    shipped: ProfileSet, two_boxes: dict[str, GpuInventory]
) -> None:
    # llama-3-70b-awq: on one box only 7,168 of its 8,192 tokens fit (test_planner.py); split in
    # two stages of 40 layers, each GPU holds a quarter of the 39,686,625,000 bytes of weights.
    weights_per_gpu = 39_686_625_000 * 40 // (80 * 2)  # 9,921,656,250
    kv_per_token_per_gpu = 2 * 40 * 4 * 128 * 2  # 81,920
    required = weights_per_gpu + kv_per_token_per_gpu * 8192 + OVERHEAD  # 12,740,228,538
    single = plan_across_nodes(shipped.get("llama-3-70b-awq"), two_boxes)
    assert (single.fit, single.max_model_len, single.nodes) == (
        Fit.FITS_REDUCED_CONTEXT,
        7168,
        ("box-a",),
    )
    profile = with_vllm(shipped.get("llama-3-70b-awq"), pipeline_parallel_size="auto")
    verdict = plan_across_nodes(profile, two_boxes)
    assert verdict.fit is Fit.FITS
    assert verdict.max_model_len == 8192
    assert (verdict.tensor_parallel_size, verdict.pipeline_parallel_size) == (2, 2)
    assert verdict.per_gpu_required_bytes == required
    assert any(
        r.startswith("tensor_parallel_size 2 on node box-a (GPU 0, 1): needs 21.73 GiB per GPU")
        for r in verdict.reasons
    )


def test_a_model_that_fits_one_node_stays_on_one_node_with_auto(
    shipped: ProfileSet, two_boxes: dict[str, GpuInventory]
) -> None:
    # deepseek-coder-33b-awq fits as T2 x P1 and as T1 x P2 alike (13,605,577,182 bytes per
    # GPU either way: half the weights and half the KV cache); with two GPUs each, the split
    # on fewer nodes is tried first.
    profile = with_vllm(shipped.get("deepseek-coder-33b-awq"), pipeline_parallel_size="auto")
    verdict = plan_across_nodes(profile, two_boxes)
    assert verdict.fit is Fit.FITS
    assert (verdict.tensor_parallel_size, verdict.pipeline_parallel_size) == (2, 1)
    assert verdict.nodes == ("box-a",)
    assert verdict.node_gpu_ids == ((0, 1),)
    assert verdict.per_gpu_required_bytes == 13_605_577_182
    assert (
        verdict.per_gpu_required_bytes
        == plan_profile(profile, two_boxes["box-a"]).per_gpu_required_bytes
    )
    assert verdict.reasons[-1].startswith(
        "fits with tensor_parallel_size 2 on node box-a (GPU 0, 1)"
    )
    assert "--pipeline-parallel-size" not in vllm_args(profile, verdict, 8123)


def test_a_pinned_pipeline_larger_than_the_cluster_does_not_fit(
    shipped: ProfileSet, two_boxes: dict[str, GpuInventory]
) -> None:
    profile = with_vllm(shipped.get("deepseek-coder-33b"), pipeline_parallel_size=3)
    verdict = plan_across_nodes(profile, two_boxes)
    assert verdict.fit is Fit.DOES_NOT_FIT
    assert verdict.reasons == (
        "pipeline_parallel_size 3 needs 3 nodes (one pipeline stage per node); 2 found "
        "(box-a, box-b)",
    )


def test_a_pinned_split_wider_than_every_node_does_not_fit(
    shipped: ProfileSet, two_boxes: dict[str, GpuInventory]
) -> None:
    profile = with_vllm(
        shipped.get("deepseek-coder-33b"), tensor_parallel_size=4, pipeline_parallel_size=2
    )
    verdict = plan_across_nodes(profile, two_boxes)
    assert verdict.fit is Fit.DOES_NOT_FIT
    assert verdict.reasons == (
        "tensor_parallel_size 4 needs 4 GPUs on each node of the split; the most on one node is 2",
    )


def test_the_widest_split_says_what_it_would_need(
    shipped: ProfileSet, two_boxes: dict[str, GpuInventory]
) -> None:
    # Llama 3 70B in bf16: 141,108,000,000 bytes / 4 GPUs = 35,277,000,000 bytes of weights on
    # each, before any KV cache (81,920 bytes per token per GPU); the reason gives the
    # reduced context's floor of 2048 tokens, the numbers the requested 8192.
    required = 141_108_000_000 // 4 + 81_920 * 8192 + OVERHEAD  # 38,095,572,288
    profile = with_vllm(shipped.get("llama-3-70b"), pipeline_parallel_size="auto")
    verdict = plan_across_nodes(profile, two_boxes)
    assert verdict.fit is Fit.DOES_NOT_FIT
    assert (verdict.tensor_parallel_size, verdict.pipeline_parallel_size) == (2, 2)
    assert verdict.nodes == ()
    assert verdict.gpu_ids == ()
    assert verdict.reasons[-1] == (
        "does not fit: even the widest split, tensor_parallel_size 2 x pipeline_parallel_size 2 "
        "across nodes box-a, box-b (box-a GPU 0, 1; box-b GPU 0, 1), needs 35.01 GiB per GPU "
        "for 2048 tokens (weights 32.85 GiB + KV cache 0.16 GiB for 40 layers of a stage + "
        "overhead 2.00 GiB), more than the 21.60 GiB budget; more nodes or a quantized variant "
        "may fit"
    )
    assert verdict.per_gpu_required_bytes == required
    assert verdict.per_gpu_budget_bytes == BUDGET


def test_a_busy_node_sends_a_single_node_model_to_the_other_node(
    shipped: ProfileSet, box: GpuInventory
) -> None:
    # Another program holds 20 GiB of box-a's GPU 1: box-b has more free memory and comes
    # first, although box-a's GPU 0 alone could hold Qwen2-7B too.
    nodes = {"box-a": busy(box, 1, 20 * GIB), "box-b": box}
    assert plan_profile(shipped.get("qwen2-7b"), nodes["box-a"]).fit is Fit.FITS
    small = plan_across_nodes(shipped.get("qwen2-7b"), nodes)
    assert (small.fit, small.nodes, small.gpu_ids) == (Fit.FITS, ("box-b",), (1,))
    assert small.node_gpu_ids == ((1,),)
    assert small.reasons[-1].startswith("box-b: fits with tensor_parallel_size 1 on GPU 1")
    # A two-GPU model would have fitted on box-a with a warning; on box-b it needs none.
    pair = plan_across_nodes(shipped.get("qwen2-14b"), nodes)
    assert (pair.fit, pair.nodes, pair.gpu_ids) == (Fit.FITS, ("box-b",), (0, 1))
    assert not any("warning:" in r for r in pair.reasons)


def test_a_split_across_a_busy_node_puts_the_idle_node_first_and_warns_about_the_other(
    shipped: ProfileSet, box: GpuInventory
) -> None:
    nodes = {"box-a": busy(box, 1, 20 * GIB), "box-b": box}
    profile = with_vllm(shipped.get("deepseek-coder-33b"), pipeline_parallel_size="auto")
    verdict = plan_across_nodes(profile, nodes)
    assert verdict.fit is Fit.FITS
    assert verdict.nodes == ("box-b", "box-a")
    assert verdict.per_gpu_free_bytes == TOTAL - 20 * GIB
    assert verdict.reasons[-1].startswith(
        "box-a: warning: GPU 1 has 4.00 GiB free, less than the 21.60 GiB budget"
    )


def test_the_vllm_argv_of_a_split_across_nodes_names_both_sizes_and_ray(
    shipped: ProfileSet, two_boxes: dict[str, GpuInventory]
) -> None:
    profile = with_vllm(shipped.get("deepseek-coder-33b"), pipeline_parallel_size="auto")
    verdict = plan_across_nodes(profile, two_boxes)
    args = vllm_args(profile, verdict, 8123)
    start = args.index("--tensor-parallel-size")
    assert args[start : start + 6] == (
        "--tensor-parallel-size", "2",
        "--pipeline-parallel-size", "2",
        "--distributed-executor-backend", "ray",
    )  # fmt: skip
    spec = build_engine_spec(
        profile,
        verdict,
        port=8123,
        vllm_python="/opt/vllm/bin/python",
        hf_cache=None,
        hf_token=None,
        log_dir=None,
        instance="test",
    )
    assert spec.command == args


def test_a_split_verdict_serializes_to_json(
    shipped: ProfileSet, two_boxes: dict[str, GpuInventory]
) -> None:
    profile = with_vllm(shipped.get("deepseek-coder-33b"), pipeline_parallel_size=2)
    data = json.loads(json.dumps(plan_across_nodes(profile, two_boxes).to_dict()))
    assert data["fit"] == "fits"
    assert data["pipeline_parallel_size"] == 2
    assert data["nodes"] == ["box-a", "box-b"]
    assert data["node_gpu_ids"] == [[0, 1], [0, 1]]


def test_a_simulator_standing_in_for_a_large_model_may_span_nodes(
    shipped: ProfileSet, two_boxes: dict[str, GpuInventory]
) -> None:
    arch = shipped.get("deepseek-coder-33b").architecture
    assert arch is not None
    profile = Profile.model_validate(
        {
            "id": "sim-33b",
            "display_name": "Simulator as a 33B",
            "engine": "simulator",
            "runtime": "process",
            "served_model_name": "sim-33b",
            "architecture": arch.model_dump(),
            "vllm": {"dtype": "bfloat16", "pipeline_parallel_size": "auto"},
        }
    )
    verdict = plan_across_nodes(profile, two_boxes)
    assert (verdict.fit, verdict.nodes) == (Fit.FITS, ("box-a", "box-b"))


def llama_cpp_profile(**vllm: Any) -> dict[str, Any]:
    """A llama_cpp profile (a local GGUF file) with these vllm arguments."""
    return {
        "display_name": "GGUF",
        "engine": "llama_cpp",
        "runtime": "process",
        "model": "/models/llama-3-8b.Q4_K_M.gguf",
        "served_model_name": "gguf",
        "llama_cpp": {"gguf_type": "Q4_K_M"},
        "architecture": {
            "params_b": 8.03,
            "layers": 32,
            "attention_heads": 32,
            "kv_heads": 8,
            "head_dim": 128,
            "max_context": 8192,
        },
        **({"vllm": vllm} if vllm else {}),
    }


def test_a_llama_cpp_profile_cannot_span_nodes() -> None:
    fine = profiles_from_data({"default": "p", "profiles": {"p": llama_cpp_profile()}}, "x.yml")
    assert fine.get("p").vllm.pipeline_parallel_size == 1
    data = {"default": "p", "profiles": {"p": llama_cpp_profile(pipeline_parallel_size=2)}}
    with pytest.raises(ProfileError) as caught:
        profiles_from_data(data, "model_profiles.yml")
    assert (
        "model_profiles.yml: profile 'p': vllm: engine llama_cpp takes llama_cpp arguments, not "
        "vllm ones; vllm.pipeline_parallel_size: engine llama_cpp runs on one node; only vllm "
        "engines (and simulators standing in for them) span nodes"
    ) in str(caught.value)
