"""VRAM planner: will a profile fit on these GPUs, with which tensor parallelism, and why.

Pure functions over a Profile and a GpuInventory. The estimate per GPU, for tensor parallel
size n, mirrors how vLLM budgets memory at startup:

    weights / n  +  KV cache for max_model_len tokens (its n-th share)  +  RUNTIME_OVERHEAD

must be at most gpu_memory_utilization x the GPU's TOTAL memory (vLLM sizes its budget from
the total; memory other processes hold is reported as a warning, because vLLM refuses to
start when free memory is below that budget).

- weights = params x bytes per parameter (BYTES_PER_PARAM: fp32 4, fp16/bf16 2, fp8 1,
  4-bit AWQ/GPTQ 0.5625).
- KV cache per token = 2 (K and V) x layers x kv_heads x head_dim x bytes per KV element
  (2 for fp16/bf16, 4 for float32, 1 for kv_cache_dtype fp8). It must hold
  MIN_CONCURRENT_SEQUENCES (1) full-length sequence: vLLM refuses to start when one
  max_model_len sequence does not fit, and more sequences only share what is left.
- With n GPUs each holds 1/n of the weights and kv_heads / n KV heads (one replicated head
  when n > kv_heads).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, replace
from enum import StrEnum
from pathlib import Path
from typing import Any

from orchestrator.gguf import BITS_PER_WEIGHT, GgufError, read_gguf
from orchestrator.gpus import GpuInfo, GpuInventory
from orchestrator.profiles import Architecture, Engine, Profile, ProfileSet, Quantization

GIB = 1024**3

# Bytes per weight. 4-bit AWQ/GPTQ is 0.5 for the packed weights plus 0.0625 (4.5 bits in
# all) for group-128 fp16 scales and zero points and the embedding and lm_head that stay fp16:
# calibrated on real checkpoints, 70.55B x 0.5625 = 39.7 GB against the 39.8 GB of
# casperhansen/llama-3-70b-instruct-awq, and 33.34B x 0.5625 = 18.8 GB against the 18.0 GB
# of TheBloke/deepseek-coder-33B-instruct-AWQ (an estimate that errs on the safe side).
BYTES_PER_PARAM = {"float32": 4.0, "float16": 2.0, "bfloat16": 2.0, "fp8": 1.0, "int4": 0.5625}
INT4_QUANTIZATIONS = frozenset(
    {Quantization.AWQ, Quantization.AWQ_MARLIN, Quantization.GPTQ, Quantization.GPTQ_MARLIN}
)

# Per GPU, outside weights and KV cache: the CUDA context, NCCL buffers and other non-torch
# allocations (~0.5 GiB) plus the activation peak of vLLM's profiling forward pass at its
# default batch of tokens (1-1.5 GiB in vLLM's startup logs for 7-70B models). CUDA graphs
# are captured after the budget is set; the 10% that gpu_memory_utilization 0.90 leaves
# unbudgeted is what they (and the desktop) use.
RUNTIME_OVERHEAD_BYTES_PER_GPU = 2 * GIB
# llama.cpp per GPU: the CUDA context (~0.3-0.5 GiB) and its compute buffer at the default
# batch (n_ubatch 512: a few hundred MiB for 7-14B models in llama.cpp's load logs); no
# profiling pass and no CUDA graphs of vLLM's size.
LLAMA_CPP_OVERHEAD_BYTES_PER_GPU = 1 * GIB
# llama.cpp keeps its KV cache in f16 unless told otherwise.
LLAMA_CPP_KV_BYTES = 2

TP_CANDIDATES = (1, 2, 4, 8)
MIN_CONCURRENT_SEQUENCES = 1
# A reduced context is a multiple of CONTEXT_STEP_TOKENS and at least MIN_REDUCED_CONTEXT
# tokens (anything shorter is not useful for chat); a profile whose own max_model_len is at
# most MIN_REDUCED_CONTEXT (a tiny model) may go down to CONTEXT_STEP_TOKENS.
CONTEXT_STEP_TOKENS = 256
MIN_REDUCED_CONTEXT = 2048

NO_GPU_REASON = "runs without a GPU"


class Fit(StrEnum):
    """The planner's verdict."""

    FITS = "fits"
    FITS_REDUCED_CONTEXT = "fits_reduced_context"
    DOES_NOT_FIT = "does_not_fit"


@dataclass(frozen=True)
class FitVerdict:
    """A verdict with the numbers behind it (bytes; per GPU where the name says so)."""

    profile_id: str
    fit: Fit
    reasons: tuple[str, ...]
    uses_gpu: bool = True
    tensor_parallel_size: int = 1
    gpu_ids: tuple[int, ...] = ()
    max_model_len: int | None = None
    requested_max_model_len: int | None = None
    weights_bytes: int = 0
    kv_bytes_per_token: int = 0
    kv_bytes: int = 0
    overhead_bytes: int = 0
    per_gpu_required_bytes: int = 0
    per_gpu_budget_bytes: int = 0
    per_gpu_free_bytes: int | None = None
    # llama.cpp with partial offload: the layers on the GPUs (the rest run on the CPU); None
    # when the whole model is on the GPUs (or it runs without one).
    gpu_layers: int | None = None
    # Across nodes (orchestrator/pipeline.py): the pipeline stages, the node of each stage in
    # stage order and each stage's GPU indices on its node (gpu_ids is then the first stage's).
    # Empty when no node is named: planned on one inventory (plan_profile), or not placed.
    pipeline_parallel_size: int = 1
    nodes: tuple[str, ...] = ()
    node_gpu_ids: tuple[tuple[int, ...], ...] = ()

    @property
    def fits(self) -> bool:
        """True unless the verdict is does_not_fit."""
        return self.fit is not Fit.DOES_NOT_FIT

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        data = asdict(self)
        data["fit"] = self.fit.value
        data["reasons"] = list(self.reasons)
        data["gpu_ids"] = list(self.gpu_ids)
        data["nodes"] = list(self.nodes)
        data["node_gpu_ids"] = [list(ids) for ids in self.node_gpu_ids]
        return data


@dataclass(frozen=True)
class _Sizing:
    """The memory arithmetic for one tensor parallel size on a chosen set of GPUs."""

    tp: int
    gpus: tuple[GpuInfo, ...]
    weights_per_gpu: int
    kv_per_token_per_gpu: int
    budget: int
    overhead: int = RUNTIME_OVERHEAD_BYTES_PER_GPU

    def kv(self, tokens: int) -> int:
        return self.kv_per_token_per_gpu * tokens * MIN_CONCURRENT_SEQUENCES

    def required(self, tokens: int) -> int:
        return self.weights_per_gpu + self.kv(tokens) + self.overhead

    def room_for_kv(self) -> int:
        return self.budget - self.weights_per_gpu - self.overhead

    def max_tokens(self) -> int:
        per_token = self.kv_per_token_per_gpu * MIN_CONCURRENT_SEQUENCES
        return max(0, self.room_for_kv() // per_token)


def runtime_overhead(profile: Profile) -> int:
    """Bytes per GPU outside weights and KV cache for this profile's engine."""
    if profile.engine is Engine.LLAMA_CPP:
        return LLAMA_CPP_OVERHEAD_BYTES_PER_GPU
    return RUNTIME_OVERHEAD_BYTES_PER_GPU


def gguf_quantization(profile: Profile) -> str | None:
    """A llama_cpp profile's file type: the header's when the file is here, else the declared
    `llama_cpp.gguf_type` (None when neither is known)."""
    model = profile.model
    if profile.is_local_model and model is not None:
        path = Path(model).expanduser()
        if path.is_file():
            try:
                found = read_gguf(path).quantization
            except (GgufError, OSError):
                found = None
            if found is not None:
                return found
    return profile.llama_cpp.gguf_type


def bytes_per_param(profile: Profile) -> float:
    """Bytes per weight from the quantization, else from the dtype (auto = 16-bit); a GGUF
    file's from its file type (llama.cpp's measured bits per weight)."""
    if profile.engine is Engine.LLAMA_CPP:
        kind = gguf_quantization(profile)
        bits = BITS_PER_WEIGHT.get(kind.upper()) if kind else None
        return (bits if bits is not None else 16.0) / 8
    if profile.quantization in INT4_QUANTIZATIONS:
        return BYTES_PER_PARAM["int4"]
    if profile.quantization is Quantization.FP8:
        return BYTES_PER_PARAM["fp8"]
    return BYTES_PER_PARAM["float32"] if profile.vllm.dtype == "float32" else 2.0


def kv_bytes_per_element(profile: Profile) -> int:
    """Bytes per cached K or V value: 1 for an fp8 KV cache, else the activation dtype (f16
    for llama.cpp)."""
    if profile.engine is Engine.LLAMA_CPP:
        return LLAMA_CPP_KV_BYTES
    if profile.vllm.kv_cache_dtype == "fp8":
        return 1
    return 4 if profile.vllm.dtype == "float32" else 2


def weights_bytes(arch: Architecture, per_param: float) -> int:
    """Weight memory of the whole model (to the nearest byte)."""
    return round(arch.params_b * 1e9 * per_param)


def kv_heads_per_gpu(kv_heads: int, tp: int) -> int:
    """KV heads each GPU holds: its share, or one replicated head when tp > kv_heads."""
    return kv_heads // tp if kv_heads >= tp else 1


def kv_bytes_per_token(arch: Architecture, element_bytes: int, tp: int = 1) -> int:
    """KV cache bytes per token on one GPU of a tp-way split (tp=1: the whole model)."""
    return 2 * arch.layers * kv_heads_per_gpu(arch.kv_heads, tp) * arch.head_dim * element_bytes


def tensor_parallel_problem(
    arch: Architecture, tp: int, gpu_count: int, *, layer_split: bool = False
) -> str | None:
    """Why vLLM cannot split this model tp ways on gpu_count GPUs, or None (`layer_split`:
    llama.cpp, which splits whole layers across GPUs and so any head count)."""
    if layer_split:
        return f"{tp} GPUs wanted; {gpu_count} found" if tp > gpu_count else None
    if arch.attention_heads % tp:
        return (
            f"tensor_parallel_size {tp} does not divide the model's {arch.attention_heads} "
            "attention heads (vLLM requires attention_heads % tensor_parallel_size == 0)"
        )
    if arch.kv_heads % tp and tp % arch.kv_heads:
        return (
            f"tensor_parallel_size {tp} and the model's {arch.kv_heads} KV heads do not divide "
            "one another (vLLM shards or replicates whole KV heads)"
        )
    if tp > gpu_count:
        return f"tensor_parallel_size {tp} needs {tp} GPUs; {gpu_count} found"
    return None


def choose_gpus(inventory: GpuInventory, count: int) -> tuple[GpuInfo, ...]:
    """The `count` GPUs with the most free memory (lower index first on a tie), by index."""
    ranked = sorted(inventory.gpus, key=lambda gpu: (-gpu.memory_free_bytes, gpu.index))
    return tuple(sorted(ranked[:count], key=lambda gpu: gpu.index))


def per_gpu_budget(gpus: Iterable[GpuInfo], utilization: float) -> int:
    """gpu_memory_utilization x total memory of the smallest chosen GPU."""
    return math.floor(utilization * min(gpu.memory_total_bytes for gpu in gpus))


def round_down_context(tokens: int) -> int:
    """Round a token count down to a multiple of CONTEXT_STEP_TOKENS."""
    return tokens // CONTEXT_STEP_TOKENS * CONTEXT_STEP_TOKENS


def min_context(requested: int) -> int:
    """The shortest context a reduced plan may offer for a profile asking for `requested`."""
    return CONTEXT_STEP_TOKENS if requested <= MIN_REDUCED_CONTEXT else MIN_REDUCED_CONTEXT


def gib(value: int) -> str:
    """Bytes as 'N.NN GiB'."""
    return f"{value / GIB:.2f} GiB"


def free_memory_warnings(gpus: Iterable[GpuInfo], budget: int) -> list[str]:
    """A warning per chosen GPU whose free memory is below the per-GPU budget."""
    warnings = []
    for gpu in gpus:
        if gpu.memory_free_bytes < budget:
            holders = ", ".join(f"pid {p.pid} {p.name}".rstrip() for p in gpu.processes)
            held = f" (held by {holders})" if holders else ""
            warnings.append(
                f"warning: GPU {gpu.index} has {gib(gpu.memory_free_bytes)} free, less than the "
                f"{gib(budget)} budget: {gib(gpu.memory_used_bytes)} is in use{held}; vLLM "
                "refuses to start until that memory is freed or gpu_memory_utilization is lowered"
            )
    return warnings


def plan_profile(profile: Profile, inventory: GpuInventory) -> FitVerdict:
    """The verdict for one profile on these GPUs."""
    if not profile.uses_gpu:
        return FitVerdict(
            profile_id=profile.id,
            fit=Fit.FITS,
            reasons=(f"{NO_GPU_REASON} ({_no_gpu_kind(profile)})",),
            uses_gpu=False,
            max_model_len=profile.max_model_len,
            requested_max_model_len=profile.max_model_len,
        )
    arch = profile.architecture
    requested = profile.max_model_len
    if arch is None or requested is None:  # refused at load time; kept for the type checker
        return _refused(profile, "architecture: required for a GPU profile")
    if inventory.count == 0:
        return _refused(profile, f"no GPU available: {inventory.reason or 'no GPU found'}")
    sizings, skips = _sizings(profile, arch, inventory)
    skipped = [reason for _, reason in skips]
    if not sizings:
        return _refused(profile, *skipped)
    element = kv_bytes_per_element(profile)
    total_weights = weights_bytes(arch, bytes_per_param(profile))
    per_token = kv_bytes_per_token(arch, element)
    tried: list[str] = []
    for sizing in sizings:
        if sizing.required(requested) <= sizing.budget:
            # Sizes ruled out above the chosen one do not matter to a fit.
            smaller = [reason for tp, reason in skips if tp < sizing.tp]
            reasons = [*smaller, *tried, _fits_reason(sizing, requested)]
            return _verdict(profile, Fit.FITS, reasons, sizing, requested, total_weights, per_token)
        tried.append(_too_big_reason(sizing, requested))
    if profile.engine is Engine.LLAMA_CPP:
        offload = _partial_offload(profile, arch, sizings[-1], requested, tried, total_weights)
        if offload is not None:
            return offload
    best = max(sizings, key=lambda s: (round_down_context(min(s.max_tokens(), requested)), -s.tp))
    reduced = round_down_context(min(best.max_tokens(), requested))
    if reduced >= min_context(requested):
        reasons = [
            *skipped,
            *tried,
            f"max_model_len {requested} does not fit; {reduced} tokens do (the most KV cache "
            f"that fits, rounded down to a multiple of {CONTEXT_STEP_TOKENS})",
            _fits_reason(best, reduced),
        ]
        return _verdict(
            profile, Fit.FITS_REDUCED_CONTEXT, reasons, best, reduced, total_weights, per_token
        )
    # The widest split is the most favourable one: the reason and numbers describe it.
    widest = sizings[-1]
    reasons = [*skipped, *tried, _no_fit_reason(widest, min_context(requested))]
    return _verdict(profile, Fit.DOES_NOT_FIT, reasons, widest, requested, total_weights, per_token)


def offload_layers(
    arch: Architecture, total_weights: int, kv_per_token: int, tokens: int, room: int
) -> int:
    """llama.cpp's layers that fit in `room` bytes of GPU memory (each with its weights and
    its KV cache for `tokens`); what is left runs on the CPU."""
    per_layer = math.ceil((total_weights + kv_per_token * tokens) / arch.layers)
    return max(0, min(arch.layers, room // per_layer))


def _partial_offload(
    profile: Profile,
    arch: Architecture,
    sizing: _Sizing,
    tokens: int,
    tried: list[str],
    total_weights: int,
) -> FitVerdict | None:
    """A llama.cpp verdict with the layers that fit on the GPUs (the widest split), or None
    when not even one does."""
    per_token = kv_bytes_per_token(arch, kv_bytes_per_element(profile))
    room = (sizing.budget - sizing.overhead) * sizing.tp
    layers = offload_layers(arch, total_weights, per_token, tokens, room)
    if layers < 1 or layers >= arch.layers:
        return None
    on_gpus = math.ceil((total_weights + per_token * tokens) * layers / arch.layers)
    reason = (
        f"partial offload: {layers} of {arch.layers} layers on GPU "
        f"{', '.join(str(g.index) for g in sizing.gpus)} ({gib(on_gpus)} of weights and KV "
        f"cache for {tokens} tokens), the other {arch.layers - layers} on the CPU (in host "
        "RAM; generation is slower)"
    )
    verdict = _verdict(
        profile, Fit.FITS, [*tried, reason], sizing, tokens, total_weights, per_token
    )
    return replace(
        verdict,
        gpu_layers=layers,
        per_gpu_required_bytes=math.ceil(on_gpus / sizing.tp) + sizing.overhead,
    )


Plan = Callable[[Profile, GpuInventory], "FitVerdict"]


def plan_all(
    profiles: ProfileSet, inventory: GpuInventory, plan: Plan | None = None
) -> dict[str, FitVerdict]:
    """The verdict for every profile, by id (`plan`: plan_profile unless given another, e.g.
    a cluster's)."""
    chosen = plan or plan_profile
    return {pid: chosen(profile, inventory) for pid, profile in profiles.profiles.items()}


def recommend(
    profiles: ProfileSet, inventory: GpuInventory, plan: Plan | None = None
) -> list[FitVerdict]:
    """Profiles that fit, best first: the default, then full-context GPU profiles by size
    (largest first), then reduced-context ones by size, then profiles without a GPU."""
    verdicts = [v for v in plan_all(profiles, inventory, plan).values() if v.fits]

    def rank(verdict: FitVerdict) -> tuple[int, float, str]:
        arch = profiles.get(verdict.profile_id).architecture
        size = arch.params_b if arch else 0.0
        if verdict.profile_id == profiles.default_id:
            group = 0
        elif not verdict.uses_gpu:
            group = 3
        else:
            group = 1 if verdict.fit is Fit.FITS else 2
        return (group, -size, verdict.profile_id)

    return sorted(verdicts, key=rank)


def _sizings(
    profile: Profile, arch: Architecture, inventory: GpuInventory
) -> tuple[list[_Sizing], list[tuple[int, str]]]:
    """The tensor parallel sizes to try (pinned, or each candidate) and why others are out."""
    pinned = profile.vllm.tensor_parallel_size
    candidates = (
        [pinned]
        if isinstance(pinned, int)
        else [tp for tp in TP_CANDIDATES if tp <= inventory.count]
    )
    element = kv_bytes_per_element(profile)
    total_weights = weights_bytes(arch, bytes_per_param(profile))
    sizings: list[_Sizing] = []
    skipped: list[tuple[int, str]] = []
    llama = profile.engine is Engine.LLAMA_CPP
    for tp in candidates:
        problem = tensor_parallel_problem(arch, tp, inventory.count, layer_split=llama)
        if problem:
            skipped.append((tp, problem))
            continue
        gpus = choose_gpus(inventory, tp)
        sizings.append(
            _Sizing(
                tp=tp,
                gpus=gpus,
                weights_per_gpu=math.ceil(total_weights / tp),
                # llama.cpp splits layers, each with its own KV: a GPU holds its layers' share.
                kv_per_token_per_gpu=(
                    math.ceil(kv_bytes_per_token(arch, element) / tp)
                    if llama
                    else kv_bytes_per_token(arch, element, tp)
                ),
                budget=per_gpu_budget(gpus, profile.vllm.gpu_memory_utilization),
                overhead=runtime_overhead(profile),
            )
        )
    return sizings, skipped


def _fits_reason(sizing: _Sizing, tokens: int) -> str:
    ids = ", ".join(str(gpu.index) for gpu in sizing.gpus)
    return (
        f"fits with tensor_parallel_size {sizing.tp} on GPU {ids}: "
        f"{gib(sizing.required(tokens))} per GPU of a {gib(sizing.budget)} budget "
        f"(weights {gib(sizing.weights_per_gpu)} + KV cache "
        f"{gib(sizing.kv(tokens))} for {tokens} tokens + overhead "
        f"{gib(sizing.overhead)})"
    )


def _too_big_reason(sizing: _Sizing, tokens: int) -> str:
    return (
        f"tensor_parallel_size {sizing.tp}: needs {gib(sizing.required(tokens))} per GPU for "
        f"{tokens} tokens, more than the {gib(sizing.budget)} budget "
        f"(weights alone {gib(sizing.weights_per_gpu)})"
    )


def _no_fit_reason(sizing: _Sizing, floor: int) -> str:
    if sizing.room_for_kv() <= 0:
        return (
            f"does not fit: with tensor_parallel_size {sizing.tp} the weights alone take "
            f"{gib(sizing.weights_per_gpu)} per GPU, plus {gib(sizing.overhead)} "
            f"overhead, over the {gib(sizing.budget)} budget; a quantized variant may fit"
        )
    return (
        f"does not fit: even a {floor}-token context needs more KV cache than the "
        f"{sizing.max_tokens()} tokens that fit next to the weights at tensor_parallel_size "
        f"{sizing.tp}"
    )


def _verdict(
    profile: Profile,
    fit: Fit,
    reasons: list[str],
    sizing: _Sizing,
    tokens: int,
    total_weights: int,
    per_token: int,
) -> FitVerdict:
    free = min(gpu.memory_free_bytes for gpu in sizing.gpus)
    warnings = (
        free_memory_warnings(sizing.gpus, sizing.budget) if fit is not Fit.DOES_NOT_FIT else []
    )
    return FitVerdict(
        profile_id=profile.id,
        fit=fit,
        reasons=(*reasons, *warnings),
        tensor_parallel_size=sizing.tp,
        gpu_ids=tuple(gpu.index for gpu in sizing.gpus) if fit is not Fit.DOES_NOT_FIT else (),
        max_model_len=tokens,
        requested_max_model_len=profile.max_model_len,
        weights_bytes=total_weights,
        kv_bytes_per_token=per_token,
        kv_bytes=per_token * tokens * MIN_CONCURRENT_SEQUENCES,
        overhead_bytes=sizing.overhead,
        per_gpu_required_bytes=sizing.required(tokens),
        per_gpu_budget_bytes=sizing.budget,
        per_gpu_free_bytes=free,
    )


def _refused(profile: Profile, *reasons: str) -> FitVerdict:
    return FitVerdict(
        profile_id=profile.id,
        fit=Fit.DOES_NOT_FIT,
        reasons=reasons,
        max_model_len=profile.max_model_len,
        requested_max_model_len=profile.max_model_len,
    )


def _no_gpu_kind(profile: Profile) -> str:
    if profile.engine.value == "vllm":
        return "vLLM on the CPU"
    return f"{profile.engine.value} engine"
