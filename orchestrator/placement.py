"""Placement: which GPUs a new engine gets beside the engines already resident, and which
engines to evict when it fits nowhere. Pure functions over a GPU inventory and a ledger.

The ledger holds what each resident engine claims on each GPU of its set: its whole budget
while it runs (vLLM gives everything inside `gpu_memory_utilization x total` to weights,
activations and KV cache, so its claim is its budget, not its weights), and only a residual
while it sleeps. A new engine's claim is the planner's estimate (weights/tp + KV cache for its
context + the per-GPU runtime overhead); it fits on a GPU when the claim is at most what the
GPU has left:

    total - memory not ours (other processes, the driver) - the ledger - a reserve

The reserve (`RESERVE_FRACTION` of the total) is the part a single vLLM engine at its default
`gpu_memory_utilization` 0.90 leaves unbudgeted: CUDA graphs are captured outside the budget.

For vLLM, `gpu_memory_utilization` is a fraction of the GPU's *total* memory that vLLM checks
against the *free* memory at start-up (vllm-project/vllm#14376, #10533): an engine's fraction
is therefore its claim divided by the total (`utilization_for`), and two engines whose sets
overlap must not start at the same moment, or the second measures the first's half-made
allocation. `start_problem` says whether the GPUs have the claim free right now.

A sleeping engine keeps its CUDA context and allocator state on each GPU: vLLM's own logs
report 1.19 GiB still in use after sleeping a 4B model and 4.75 GiB after level 2 on a larger
one (vllm#28714, #17117). `SLEEP_RESIDUAL_BYTES` (1.5 GiB) is the figure used when nothing was
measured; the manager replaces it with what NVML shows after the sleep.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace

from orchestrator.gpus import GpuInfo, GpuInventory
from orchestrator.planner import (
    RUNTIME_OVERHEAD_BYTES_PER_GPU,
    TP_CANDIDATES,
    bytes_per_param,
    gib,
    kv_bytes_per_element,
    kv_bytes_per_token,
    min_context,
    offload_layers,
    round_down_context,
    runtime_overhead,
    tensor_parallel_problem,
    weights_bytes,
)
from orchestrator.profiles import Engine, Profile

GIB = 1024**3
RESERVE_FRACTION = 0.10
SLEEP_RESIDUAL_BYTES = 3 * GIB // 2
# vLLM takes gpu_memory_utilization with a few decimals; rounding the fraction up by one step
# of this size never hands an engine less than its claim.
UTILIZATION_STEP = 0.001


@dataclass(frozen=True)
class Claim:
    """What one resident engine holds on each GPU of its set."""

    engine_id: str
    gpu_ids: tuple[int, ...]
    bytes_per_gpu: int
    asleep: bool = False
    residual_bytes_per_gpu: int = SLEEP_RESIDUAL_BYTES
    pinned: bool = False
    priority: int = 0
    last_used: float = 0.0
    weights_bytes: int = 0  # whole-model weights (what a level-1 sleep copies to host RAM)

    @property
    def held_per_gpu(self) -> int:
        """Bytes it holds on each of its GPUs now: the budget, or the residual while asleep."""
        return (
            min(self.residual_bytes_per_gpu, self.bytes_per_gpu)
            if self.asleep
            else (self.bytes_per_gpu)
        )


@dataclass(frozen=True)
class Ledger:
    """Every resident engine's claim."""

    claims: tuple[Claim, ...] = ()

    def held_on(self, gpu_id: int) -> int:
        """Bytes the ledger's engines hold on one GPU."""
        return sum(c.held_per_gpu for c in self.claims if gpu_id in c.gpu_ids)

    def get(self, engine_id: str) -> Claim | None:
        """One engine's claim, None when it is not resident."""
        return next((c for c in self.claims if c.engine_id == engine_id), None)

    def with_claim(self, claim: Claim) -> Ledger:
        """This ledger with `claim` added (or replacing the engine's old one)."""
        return Ledger((*(c for c in self.claims if c.engine_id != claim.engine_id), claim))

    def without(self, *engine_ids: str) -> Ledger:
        """This ledger without these engines."""
        return Ledger(tuple(c for c in self.claims if c.engine_id not in engine_ids))

    def asleep(self, engine_id: str, residual_bytes_per_gpu: int | None = None) -> Ledger:
        """The engine put to sleep (with the residual measured, when it was)."""
        claim = self.get(engine_id)
        if claim is None:
            raise KeyError(engine_id)
        residual = (
            claim.residual_bytes_per_gpu
            if residual_bytes_per_gpu is None
            else (residual_bytes_per_gpu)
        )
        return self.with_claim(replace(claim, asleep=True, residual_bytes_per_gpu=residual))


def not_ours(gpu: GpuInfo, our_pids: Iterable[int] = ()) -> int:
    """Memory held by others on this GPU: other processes and what no process accounts for
    (the driver), i.e. everything used minus what our engines' processes use."""
    ours = set(our_pids)
    ours_used = sum(p.used_memory_bytes for p in gpu.processes if p.pid in ours)
    return max(0, gpu.memory_used_bytes - ours_used)


def available(
    gpu: GpuInfo, ledger: Ledger, *, our_pids: Iterable[int] = (), not_ours_bytes: int | None = None
) -> int:
    """What a new engine may claim on this GPU: its total less what others hold, what the
    ledger's engines claim and the reserve."""
    others = not_ours(gpu, our_pids) if not_ours_bytes is None else not_ours_bytes
    reserve = math.ceil(gpu.memory_total_bytes * RESERVE_FRACTION)
    return max(0, gpu.memory_total_bytes - others - ledger.held_on(gpu.index) - reserve)


@dataclass(frozen=True)
class Requirement:
    """What an engine needs on each GPU at one tensor-parallel size."""

    tensor_parallel_size: int
    weights_per_gpu: int
    kv_bytes_per_token_per_gpu: int
    overhead_per_gpu: int = RUNTIME_OVERHEAD_BYTES_PER_GPU

    def per_gpu(self, tokens: int) -> int:
        """Bytes per GPU for a context of `tokens`."""
        return (
            self.weights_per_gpu + self.kv_bytes_per_token_per_gpu * tokens + self.overhead_per_gpu
        )

    def max_tokens(self, room: int) -> int:
        """The longest context that fits in `room` bytes per GPU."""
        left = room - self.weights_per_gpu - self.overhead_per_gpu
        return max(0, left // self.kv_bytes_per_token_per_gpu)


def requirements(
    profile: Profile, gpu_count: int
) -> tuple[list[Requirement], list[tuple[int, str]]]:
    """The tensor-parallel sizes this profile may use on `gpu_count` GPUs (the pinned one, or
    each candidate whose size divides the heads), smallest first, and why others are out."""
    arch = profile.architecture
    if arch is None:
        return [], [(0, "architecture: required to place a GPU engine")]
    pinned = profile.vllm.tensor_parallel_size
    candidates = [pinned] if isinstance(pinned, int) else list(TP_CANDIDATES)
    element = kv_bytes_per_element(profile)
    total_weights = weights_bytes(arch, bytes_per_param(profile))
    found: list[Requirement] = []
    skipped: list[tuple[int, str]] = []
    llama = profile.engine is Engine.LLAMA_CPP  # whole layers per GPU (see planner)
    for tp in candidates:
        problem = tensor_parallel_problem(arch, tp, gpu_count, layer_split=llama)
        if problem:
            skipped.append((tp, problem))
            continue
        found.append(
            Requirement(
                tensor_parallel_size=tp,
                weights_per_gpu=math.ceil(total_weights / tp),
                kv_bytes_per_token_per_gpu=(
                    math.ceil(kv_bytes_per_token(arch, element) / tp)
                    if llama
                    else kv_bytes_per_token(arch, element, tp)
                ),
                overhead_per_gpu=runtime_overhead(profile),
            )
        )
    return found, skipped


@dataclass(frozen=True)
class Placement:
    """Where an engine goes, with what it claims, and why (or why nowhere)."""

    profile_id: str
    gpu_ids: tuple[int, ...] = ()
    tensor_parallel_size: int = 0
    max_model_len: int = 0
    bytes_per_gpu: int = 0
    utilization: float = 0.0
    reasons: tuple[str, ...] = ()
    reduced_context: bool = False
    # llama.cpp with partial offload: the layers on these GPUs (None: all of them).
    gpu_layers: int | None = None

    @property
    def placed(self) -> bool:
        """True when a GPU set was found."""
        return bool(self.gpu_ids)


def utilization_for(claim_bytes: int, gpus: Sequence[GpuInfo]) -> float:
    """vLLM's gpu_memory_utilization for a claim: the fraction of the smallest GPU's total,
    rounded up to the next UTILIZATION_STEP (never less than the claim)."""
    total = min(gpu.memory_total_bytes for gpu in gpus)
    steps = math.ceil(claim_bytes / total / UTILIZATION_STEP - 1e-9)
    return round(min(1.0, steps * UTILIZATION_STEP), 3)


def place(
    profile: Profile,
    inventory: GpuInventory,
    ledger: Ledger,
    *,
    our_pids: Iterable[int] = (),
    allow_reduced_context: bool = True,
) -> Placement:
    """The smallest GPU set where the profile's estimate fits beside the ledger's engines.

    Among sets of one size the one with the most room left wins (lower indices on a tie), so
    engines spread over the GPUs before they share one. When the full context fits nowhere, the
    longest context (a multiple of the planner's step, at least its minimum) that fits is
    offered, with a reason that says so.
    """
    requested = profile.max_model_len
    if requested is None:
        return Placement(profile.id, reasons=("architecture: required to place a GPU engine",))
    if inventory.count == 0:
        return Placement(profile.id, reasons=(f"no GPU: {inventory.reason or 'none found'}",))
    pids = tuple(our_pids)
    room = {gpu.index: available(gpu, ledger, our_pids=pids) for gpu in inventory.gpus}
    needs, skipped = requirements(profile, inventory.count)
    tried: list[str] = []
    best_reduced: tuple[int, Requirement, tuple[GpuInfo, ...]] | None = None
    for need in needs:
        sets = _gpu_sets(inventory.gpus, need.tensor_parallel_size, room)
        if not sets:
            continue
        gpus = sets[0]
        fits_in = min(room[gpu.index] for gpu in gpus)
        claim = need.per_gpu(requested)
        if claim <= fits_in:
            # Sizes ruled out above the chosen one do not matter to a fit.
            smaller = [why for tp, why in skipped if tp < need.tensor_parallel_size]
            return _placed(profile, need, gpus, requested, claim, smaller + tried, reduced=False)
        tried.append(
            f"tensor_parallel_size {need.tensor_parallel_size}: needs {gib(claim)} per GPU; "
            f"the best GPU set ({_ids(gpus)}) has {gib(fits_in)} left beside the resident engines"
        )
        tokens = round_down_context(min(need.max_tokens(fits_in), requested))
        if tokens >= min_context(requested) and (best_reduced is None or tokens > best_reduced[0]):
            best_reduced = (tokens, need, gpus)
    tried = [why for _, why in skipped] + tried
    if profile.engine is Engine.LLAMA_CPP and needs:
        offloaded = _offloaded(profile, needs[-1], inventory, room, requested, tried)
        if offloaded is not None:
            return offloaded
    if allow_reduced_context and best_reduced is not None:
        tokens, need, gpus = best_reduced
        tried.append(
            f"max_model_len {requested} fits nowhere beside the resident engines; {tokens} "
            "tokens do"
        )
        return _placed(profile, need, gpus, tokens, need.per_gpu(tokens), tried, reduced=True)
    return Placement(profile.id, reasons=(*tried, "does not fit beside the resident engines"))


def start_problem(placement: Placement, inventory: GpuInventory) -> str | None:
    """Why vLLM would refuse to start this placement on the GPUs as they are now (its check:
    free memory at least utilization x total), or None."""
    for gpu in inventory.gpus:
        if gpu.index not in placement.gpu_ids:
            continue
        wanted = math.ceil(placement.utilization * gpu.memory_total_bytes)
        if gpu.memory_free_bytes < wanted:
            return (
                f"GPU {gpu.index} has {gib(gpu.memory_free_bytes)} free, less than the "
                f"{gib(wanted)} its gpu_memory_utilization {placement.utilization} asks for: "
                "another engine on it has not settled yet (start one engine per GPU at a time)"
            )
    return None


@dataclass(frozen=True)
class Eviction:
    """Engines to evict so that a profile fits, and the placement it then gets."""

    victims: tuple[str, ...]
    placement: Placement


def choose_victims(
    profile: Profile,
    inventory: GpuInventory,
    ledger: Ledger,
    *,
    our_pids: Iterable[int] = (),
    busy: Iterable[str] = (),
) -> Eviction | None:
    """The smallest set of evictable engines whose removal lets `profile` fit at its full
    context, None when no such set exists (it does not fit on these GPUs even alone).

    Never a pinned engine, never one in `busy` (engines the caller cannot drain in time);
    among sets of one size, the least recently used (lowest priority first) wins. Evicting
    frees an engine's whole claim, asleep or not: a victim is stopped, or put to sleep by the
    caller when a residual is enough.
    """
    pids = tuple(our_pids)
    busy_ids = set(busy)
    candidates = sorted(
        (c for c in ledger.claims if not c.pinned and c.engine_id not in busy_ids),
        key=lambda c: (c.priority, c.last_used, c.engine_id),
    )
    for size in range(len(candidates) + 1):
        for victims in itertools.combinations(candidates, size):
            left = ledger.without(*(c.engine_id for c in victims))
            placement = place(profile, inventory, left, our_pids=pids, allow_reduced_context=False)
            if placement.placed:
                return Eviction(tuple(c.engine_id for c in victims), placement)
    return None


def sleep_level_for(claim: Claim, wanted: int, host_free_bytes: int) -> int:
    """The sleep level to use for an evicted engine: 0 (stop) when the profile has no sleep
    mode; level 1 only when free host RAM holds its weights (level 1 copies them there),
    else level 2."""
    if wanted == 0:
        return 0
    if wanted == 1 and claim.weights_bytes <= host_free_bytes:
        return 1
    return 2


def claim_for(placement: Placement, profile: Profile, *, last_used: float) -> Claim:
    """The ledger entry of a placed engine."""
    arch = profile.architecture
    weights = weights_bytes(arch, bytes_per_param(profile)) if arch else 0
    return Claim(
        engine_id=profile.id,
        gpu_ids=placement.gpu_ids,
        bytes_per_gpu=placement.bytes_per_gpu,
        pinned=profile.pinned,
        priority=profile.priority,
        last_used=last_used,
        weights_bytes=weights,
    )


@dataclass(frozen=True)
class Mismatch:
    """A GPU where NVML and the ledger disagree by more than the tolerance."""

    gpu_id: int
    nvml_used_bytes: int
    expected_bytes: int

    @property
    def difference(self) -> int:
        """NVML minus the ledger (positive: more in use than the ledger accounts for)."""
        return self.nvml_used_bytes - self.expected_bytes


@dataclass(frozen=True)
class LedgerCheck:
    """The ledger against an NVML reading."""

    mismatches: tuple[Mismatch, ...] = field(default_factory=tuple)

    @property
    def agrees(self) -> bool:
        """True when every GPU is within the tolerance."""
        return not self.mismatches


def check_ledger(
    ledger: Ledger,
    inventory: GpuInventory,
    *,
    baseline_not_ours: dict[int, int],
    tolerance_bytes: int = GIB,
) -> LedgerCheck:
    """Compare each GPU's used memory with what others held before our engines started
    (`baseline_not_ours`) plus what the ledger says our engines hold. A wrong residual figure,
    a sleep that freed less than it should or an engine nobody accounts for shows up here."""
    found = []
    for gpu in inventory.gpus:
        expected = baseline_not_ours.get(gpu.index, 0) + ledger.held_on(gpu.index)
        if abs(gpu.memory_used_bytes - expected) > tolerance_bytes:
            found.append(Mismatch(gpu.index, gpu.memory_used_bytes, expected))
    return LedgerCheck(tuple(found))


def _offloaded(
    profile: Profile,
    need: Requirement,
    inventory: GpuInventory,
    room: dict[int, int],
    tokens: int,
    tried: list[str],
) -> Placement | None:
    """llama.cpp's partial offload on the roomiest GPU set of the widest split: the layers
    that fit there (the rest on the CPU), or None when not even one does."""
    arch = profile.architecture
    sets = _gpu_sets(inventory.gpus, need.tensor_parallel_size, room)
    if arch is None or not sets:
        return None
    gpus = sets[0]
    free = min(room[gpu.index] for gpu in gpus) - need.overhead_per_gpu
    total_weights = weights_bytes(arch, bytes_per_param(profile))
    per_token = kv_bytes_per_token(arch, kv_bytes_per_element(profile))
    layers = offload_layers(arch, total_weights, per_token, tokens, free * len(gpus))
    if layers < 1 or layers >= arch.layers:
        return None
    on_gpus = math.ceil((total_weights + per_token * tokens) * layers / arch.layers)
    claim = math.ceil(on_gpus / len(gpus)) + need.overhead_per_gpu
    reason = (
        f"partial offload beside the resident engines: {layers} of {arch.layers} layers on GPU "
        f"{_ids(gpus)} (claims {gib(claim)} per GPU), the rest on the CPU"
    )
    return Placement(
        profile_id=profile.id,
        gpu_ids=tuple(gpu.index for gpu in gpus),
        tensor_parallel_size=len(gpus),
        max_model_len=tokens,
        bytes_per_gpu=claim,
        utilization=utilization_for(claim, gpus),
        reasons=(*tried, reason),
        gpu_layers=layers,
    )


def _gpu_sets(
    gpus: Sequence[GpuInfo], size: int, room: dict[int, int]
) -> list[tuple[GpuInfo, ...]]:
    """Every set of `size` GPUs on one node, the one with the most room (its tightest GPU)
    first: an engine never spans the nodes of a cluster."""
    if size > len(gpus):
        return []
    ordered = sorted(gpus, key=lambda g: g.index)
    sets = [
        combination
        for node in dict.fromkeys(gpu.node for gpu in ordered)
        for combination in itertools.combinations([g for g in ordered if g.node == node], size)
    ]
    return sorted(
        sets,
        key=lambda s: (-min(room[g.index] for g in s), tuple(g.index for g in s)),
    )


def _placed(
    profile: Profile,
    need: Requirement,
    gpus: tuple[GpuInfo, ...],
    tokens: int,
    claim: int,
    tried: list[str],
    *,
    reduced: bool,
) -> Placement:
    utilization = utilization_for(claim, gpus)
    reason = (
        f"fits with tensor_parallel_size {need.tensor_parallel_size} on GPU {_ids(gpus)}: "
        f"claims {gib(claim)} per GPU for {tokens} tokens (gpu_memory_utilization "
        f"{utilization})"
    )
    return Placement(
        profile_id=profile.id,
        gpu_ids=tuple(gpu.index for gpu in gpus),
        tensor_parallel_size=need.tensor_parallel_size,
        max_model_len=tokens,
        bytes_per_gpu=claim,
        utilization=utilization,
        reasons=(*tried, reason),
        reduced_context=reduced,
    )


def _ids(gpus: Iterable[GpuInfo]) -> str:
    chosen = tuple(gpus)
    ids = ", ".join(str(gpu.index) for gpu in chosen)
    nodes = dict.fromkeys(gpu.node for gpu in chosen if gpu.node)
    return f"{ids} (node {', '.join(node[:12] for node in nodes)})" if nodes else ids
