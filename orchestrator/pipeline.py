"""Planning across nodes: a model too big for one node as tensor parallel within a node x
pipeline parallel across nodes (vLLM's `--tensor-parallel-size T --pipeline-parallel-size P
--distributed-executor-backend ray`).

Pure functions over a Profile and one GpuInventory per node (a node is one GPU box of the
cluster, by name). An engine spans nodes only when its profile says so
(`vllm.pipeline_parallel_size` "auto" or a number above 1); with 1, the default, it runs on
one node: `plan_profile` on each node, the first that fits, else the longest reduced context,
else does_not_fit with each node's reasons. A profile without a GPU names no node (it runs
beside the gateway).

vLLM cuts the model's layers into P contiguous stages, one per node, and splits each stage's
heads T ways over T GPUs of its node. Every stage has the same T (vLLM requires it), so each
node of the split needs T GPUs, and P is at most the number of layers. The stage with the most
layers holds ceil(layers / P) of them; per GPU of that stage:

    weights  = total weights x ceil(layers / P) / layers / T
               (= total weights / (T x P) when P divides the layers)
    KV cache per token = 2 (K and V) x ceil(layers / P) x kv_heads_per_gpu(kv_heads, T)
                         x head_dim x bytes per KV element
    required = weights + KV cache for max_model_len tokens + the planner's per-GPU overhead

must be at most gpu_memory_utilization x the total memory of the smallest GPU of the split
(vLLM applies the same fraction on every worker).

Splits are tried with the fewest GPUs first (T x P), then the fewest nodes (P ascending, then
T ascending). A split's nodes are the first P nodes with at least T GPUs, those with the most
free memory (all their GPUs together) first, ties by name; on each node `choose_gpus` picks
the T GPUs with the most free memory. The first split that holds max_model_len fits; else the
split that holds the longest context (rounded down, at least `min_context`) fits with that
reduced context, as `plan_profile` would; else the verdict describes the widest split (the
most GPUs) and what it would need against its budget. A full context on more GPUs is
preferred to a reduced one on fewer, as `plan_profile` prefers a wider tensor split.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from itertools import chain

from orchestrator.gpus import GpuInfo, GpuInventory
from orchestrator.planner import (
    CONTEXT_STEP_TOKENS,
    MIN_CONCURRENT_SEQUENCES,
    TP_CANDIDATES,
    Fit,
    FitVerdict,
    bytes_per_param,
    choose_gpus,
    free_memory_warnings,
    gib,
    kv_bytes_per_element,
    kv_bytes_per_token,
    kv_heads_per_gpu,
    min_context,
    per_gpu_budget,
    plan_profile,
    round_down_context,
    runtime_overhead,
    tensor_parallel_problem,
    weights_bytes,
)
from orchestrator.profiles import Architecture, Engine, Profile

# Where a profile without a GPU is planned: it runs beside the gateway, on no node of the plan.
NO_NODE = GpuInventory(gpus=(), source="none", reason="runs beside the gateway")


@dataclass(frozen=True)
class _Split:
    """The memory arithmetic for T GPUs on each of P nodes (one pipeline stage per node)."""

    tp: int
    stages: tuple[tuple[str, tuple[GpuInfo, ...]], ...]
    stage_layers: int
    weights_per_gpu: int
    kv_per_token_per_gpu: int
    budget: int
    overhead: int

    @property
    def pp(self) -> int:
        return len(self.stages)

    @property
    def order(self) -> tuple[int, int, int]:
        return split_order(self.tp, self.pp)

    @property
    def gpus(self) -> tuple[GpuInfo, ...]:
        return stage_gpus(self.stages)

    def kv(self, tokens: int) -> int:
        return self.kv_per_token_per_gpu * tokens * MIN_CONCURRENT_SEQUENCES

    def required(self, tokens: int) -> int:
        return self.weights_per_gpu + self.kv(tokens) + self.overhead

    def max_tokens(self) -> int:
        room = self.budget - self.weights_per_gpu - self.overhead
        return max(0, room // (self.kv_per_token_per_gpu * MIN_CONCURRENT_SEQUENCES))


def spans_nodes(profile: Profile) -> bool:
    """Whether the profile may be split across nodes (pipeline_parallel_size other than 1)."""
    return profile.uses_gpu and profile.vllm.pipeline_parallel_size != 1


def split_order(tp: int, pp: int) -> tuple[int, int, int]:
    """The order splits are tried in: fewest GPUs, then fewest nodes, then smallest T."""
    return (tp * pp, pp, tp)


def stage_layers(layers: int, pp: int) -> int:
    """Layers of the largest of `pp` contiguous stages."""
    return math.ceil(layers / pp)


def pipeline_weights_per_gpu(total_weights: int, layers: int, tp: int, pp: int) -> int:
    """Weight bytes on each GPU of the largest stage: its layers' share, split tp ways."""
    return math.ceil(total_weights * stage_layers(layers, pp) / (layers * tp))


def pipeline_kv_bytes_per_token(arch: Architecture, element_bytes: int, tp: int, pp: int) -> int:
    """KV cache bytes per token on one GPU of the largest stage."""
    heads = kv_heads_per_gpu(arch.kv_heads, tp)
    return 2 * stage_layers(arch.layers, pp) * heads * arch.head_dim * element_bytes


def stage_gpus(stages: Sequence[tuple[str, tuple[GpuInfo, ...]]]) -> tuple[GpuInfo, ...]:
    """The GPUs of all stages, in stage order."""
    return tuple(chain.from_iterable(gpus for _, gpus in stages))


def free_bytes(inventory: GpuInventory) -> int:
    """Free memory of all the node's GPUs together."""
    return sum(gpu.memory_free_bytes for gpu in inventory.gpus)


def node_order(nodes: Mapping[str, GpuInventory]) -> list[str]:
    """Node names, the most free memory first, ties by name."""
    return sorted(nodes, key=lambda name: (-free_bytes(nodes[name]), name))


def plan_cluster(profile: Profile, inventory: GpuInventory) -> FitVerdict:
    """The verdict on an inventory that may span nodes (a Ray cluster's, whose GPUs name their
    node): per node, or across nodes when the profile asks; plan_profile on one host."""
    names = inventory.nodes
    if len(names) <= 1:
        return plan_profile(profile, inventory)
    return plan_across_nodes(profile, {name: inventory.on_node(name) for name in names})


def plan_across_nodes(profile: Profile, nodes: Mapping[str, GpuInventory]) -> FitVerdict:
    """The verdict for one profile on a cluster of nodes (one inventory per node name): on one
    node unless the profile's pipeline_parallel_size lets it span several."""
    if not profile.uses_gpu:
        return plan_profile(profile, NO_NODE)
    arch, requested = profile.architecture, profile.max_model_len
    if not spans_nodes(profile) or arch is None or requested is None:
        return plan_on_one_node(profile, nodes)
    if not nodes:
        return _refused(profile, "no node available: the cluster reported none")
    return _plan_splits(profile, arch, requested, nodes)


def plan_on_one_node(profile: Profile, nodes: Mapping[str, GpuInventory]) -> FitVerdict:
    """The best single-node verdict: the first node (most free memory first) where the profile
    fits, else the longest reduced context, else does_not_fit with each node's reasons."""
    order = node_order(nodes)
    if not order:
        return _refused(profile, "no node available: the cluster reported none")
    verdicts = [(name, plan_profile(profile, nodes[name])) for name in order]
    for name, verdict in verdicts:
        if verdict.fit is Fit.FITS:
            return _on_node(name, verdict)
    reduced = [(name, v) for name, v in verdicts if v.fit is Fit.FITS_REDUCED_CONTEXT]
    if reduced:
        # max() keeps the first of equals: the node with more free memory.
        return _on_node(*max(reduced, key=lambda pair: pair[1].max_model_len or 0))
    reasons = [f"{name}: {reason}" for name, verdict in verdicts for reason in verdict.reasons]
    may_span = profile.engine in (Engine.VLLM, Engine.SIMULATOR) and profile.vllm.device == "gpu"
    if len(order) > 1 and may_span and profile.vllm.pipeline_parallel_size == 1:
        reasons.append(
            "pipeline_parallel_size 1: the engine never spans nodes (vllm.pipeline_parallel_size "
            "'auto' lets the planner split it across nodes)"
        )
    return replace(verdicts[0][1], reasons=tuple(reasons))


def _on_node(name: str, verdict: FitVerdict) -> FitVerdict:
    """A single-node verdict placed on node `name` (its reasons name the node)."""
    return replace(
        verdict,
        reasons=tuple(f"{name}: {reason}" for reason in verdict.reasons),
        nodes=(name,),
        node_gpu_ids=(verdict.gpu_ids,),
    )


def _plan_splits(
    profile: Profile, arch: Architecture, requested: int, nodes: Mapping[str, GpuInventory]
) -> FitVerdict:
    splits, skips = _splits(profile, arch, nodes)
    if not splits:
        return _refused(profile, *(reason for _, reason in skips))
    total_weights = weights_bytes(arch, bytes_per_param(profile))
    per_token = kv_bytes_per_token(arch, kv_bytes_per_element(profile))
    tried: list[str] = []
    for split in splits:
        if split.required(requested) <= split.budget:
            # Splits ruled out before the chosen one are part of why it was chosen.
            earlier = [reason for order, reason in skips if order < split.order]
            reasons = [*earlier, *tried, _fits_reason(split, requested)]
            return _verdict(profile, Fit.FITS, reasons, split, requested, total_weights, per_token)
        tried.append(_too_big_reason(split, requested))
    skipped = [reason for _, reason in skips]
    best = max(splits, key=lambda s: (_reduced(s, requested), tuple(-n for n in s.order)))
    reduced = _reduced(best, requested)
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
    widest = splits[-1]
    reasons = [*skipped, *tried, _no_fit_reason(widest, min_context(requested))]
    return _verdict(profile, Fit.DOES_NOT_FIT, reasons, widest, requested, total_weights, per_token)


def _reduced(split: _Split, requested: int) -> int:
    return round_down_context(min(split.max_tokens(), requested))


def _splits(
    profile: Profile, arch: Architecture, nodes: Mapping[str, GpuInventory]
) -> tuple[list[_Split], list[tuple[tuple[int, int, int], str]]]:
    """The splits to try, in order, and why others are out (each with its place in the order)."""
    order = node_order(nodes)
    widest = max(inventory.count for inventory in nodes.values())
    tps = _tp_candidates(profile, widest)
    pps = _pp_candidates(profile, arch, len(order))
    skips: list[tuple[tuple[int, int, int], str]] = []
    pp_problem = _pp_problem(profile, arch, order)
    if pp_problem:
        return [], [(split_order(1, 1), pp_problem)]
    splits: list[_Split] = []
    for tp in tps:
        problem = _tp_problem(arch, tp, widest)
        if problem:
            skips.append((split_order(tp, pps[0]), problem))
            continue
        eligible = [name for name in order if nodes[name].count >= tp]
        for pp in pps:
            if len(eligible) < pp:
                skips.append((split_order(tp, pp), _too_few_nodes(tp, pp, eligible)))
                continue
            stages = tuple((name, choose_gpus(nodes[name], tp)) for name in eligible[:pp])
            splits.append(_split(profile, arch, tp, stages))
    return sorted(splits, key=lambda s: s.order), sorted(skips)


def _tp_candidates(profile: Profile, widest: int) -> list[int]:
    pinned = profile.vllm.tensor_parallel_size
    return [pinned] if isinstance(pinned, int) else [tp for tp in TP_CANDIDATES if tp <= widest]


def _pp_candidates(profile: Profile, arch: Architecture, node_count: int) -> list[int]:
    pinned = profile.vllm.pipeline_parallel_size
    if isinstance(pinned, int):
        return [pinned]
    return list(range(1, min(node_count, arch.layers) + 1))


def _pp_problem(profile: Profile, arch: Architecture, order: Sequence[str]) -> str | None:
    """Why a pinned pipeline_parallel_size cannot be used here, or None."""
    pp = profile.vllm.pipeline_parallel_size
    if not isinstance(pp, int):
        return None
    if pp > arch.layers:
        return (
            f"pipeline_parallel_size {pp} is more than the model's {arch.layers} layers "
            "(each stage holds whole layers)"
        )
    if pp > len(order):
        return (
            f"pipeline_parallel_size {pp} needs {pp} nodes (one pipeline stage per node); "
            f"{len(order)} found ({', '.join(order)})"
        )
    return None


def _tp_problem(arch: Architecture, tp: int, widest: int) -> str | None:
    if tp > widest:
        return (
            f"tensor_parallel_size {tp} needs {tp} GPUs on each node of the split; the most on "
            f"one node is {widest}"
        )
    return tensor_parallel_problem(arch, tp, widest)


def _too_few_nodes(tp: int, pp: int, eligible: Sequence[str]) -> str:
    found = f" ({', '.join(eligible)})" if eligible else ""
    return (
        f"tensor_parallel_size {tp} x pipeline_parallel_size {pp} needs {pp} nodes with {tp} "
        f"GPUs each; {len(eligible)} found{found}"
    )


def _split(
    profile: Profile,
    arch: Architecture,
    tp: int,
    stages: tuple[tuple[str, tuple[GpuInfo, ...]], ...],
) -> _Split:
    pp = len(stages)
    total_weights = weights_bytes(arch, bytes_per_param(profile))
    return _Split(
        tp=tp,
        stages=stages,
        stage_layers=stage_layers(arch.layers, pp),
        weights_per_gpu=pipeline_weights_per_gpu(total_weights, arch.layers, tp, pp),
        kv_per_token_per_gpu=pipeline_kv_bytes_per_token(
            arch, kv_bytes_per_element(profile), tp, pp
        ),
        budget=per_gpu_budget(stage_gpus(stages), profile.vllm.gpu_memory_utilization),
        overhead=runtime_overhead(profile),
    )


def _where(split: _Split) -> str:
    """'tensor_parallel_size 2 x pipeline_parallel_size 2 across nodes a, b (a GPU 0, 1; ...)',
    or 'tensor_parallel_size 2 on node a (GPU 0, 1)' for one stage."""
    gpus = {name: ", ".join(str(gpu.index) for gpu in chosen) for name, chosen in split.stages}
    if split.pp == 1:
        [(name, ids)] = gpus.items()
        return f"tensor_parallel_size {split.tp} on node {name} (GPU {ids})"
    names = ", ".join(gpus)
    per_node = "; ".join(f"{name} GPU {ids}" for name, ids in gpus.items())
    return (
        f"tensor_parallel_size {split.tp} x pipeline_parallel_size {split.pp} across nodes "
        f"{names} ({per_node})"
    )


def _breakdown(split: _Split, tokens: int) -> str:
    return (
        f"weights {gib(split.weights_per_gpu)} + KV cache {gib(split.kv(tokens))} for "
        f"{split.stage_layers} layers of a stage + overhead {gib(split.overhead)}"
    )


def _fits_reason(split: _Split, tokens: int) -> str:
    return (
        f"fits with {_where(split)}: {gib(split.required(tokens))} per GPU for {tokens} tokens "
        f"of a {gib(split.budget)} budget ({_breakdown(split, tokens)})"
    )


def _too_big_reason(split: _Split, tokens: int) -> str:
    return (
        f"{_where(split)}: needs {gib(split.required(tokens))} per GPU for {tokens} tokens, "
        f"more than the {gib(split.budget)} budget (weights alone {gib(split.weights_per_gpu)})"
    )


def _no_fit_reason(split: _Split, floor: int) -> str:
    return (
        f"does not fit: even the widest split, {_where(split)}, needs "
        f"{gib(split.required(floor))} per GPU for {floor} tokens ({_breakdown(split, floor)}), "
        f"more than the {gib(split.budget)} budget; more nodes or a quantized variant may fit"
    )


def _verdict(
    profile: Profile,
    fit: Fit,
    reasons: list[str],
    split: _Split,
    tokens: int,
    total_weights: int,
    per_token: int,
) -> FitVerdict:
    placed = fit is not Fit.DOES_NOT_FIT
    warnings = [
        f"{name}: {warning}"
        for name, gpus in split.stages
        for warning in free_memory_warnings(gpus, split.budget)
    ]
    node_gpu_ids = tuple(tuple(gpu.index for gpu in gpus) for _, gpus in split.stages)
    return FitVerdict(
        profile_id=profile.id,
        fit=fit,
        reasons=(*reasons, *(warnings if placed else ())),
        tensor_parallel_size=split.tp,
        pipeline_parallel_size=split.pp,
        gpu_ids=node_gpu_ids[0] if placed else (),
        nodes=tuple(name for name, _ in split.stages) if placed else (),
        node_gpu_ids=node_gpu_ids if placed else (),
        max_model_len=tokens,
        requested_max_model_len=profile.max_model_len,
        weights_bytes=total_weights,
        kv_bytes_per_token=per_token,
        kv_bytes=per_token * tokens * MIN_CONCURRENT_SEQUENCES,
        overhead_bytes=split.overhead,
        per_gpu_required_bytes=split.required(tokens),
        per_gpu_budget_bytes=split.budget,
        per_gpu_free_bytes=min(gpu.memory_free_bytes for gpu in split.gpus),
    )


def _refused(profile: Profile, *reasons: str) -> FitVerdict:
    return FitVerdict(
        profile_id=profile.id,
        fit=Fit.DOES_NOT_FIT,
        reasons=reasons,
        max_model_len=profile.max_model_len,
        requested_max_model_len=profile.max_model_len,
    )
