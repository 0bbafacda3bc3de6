"""Prometheus series named like vLLM's, plus plain in-process counters for tests."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Protocol

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    exposition,
    generate_latest,
)

#: ``Content-Type`` of the ``/metrics`` text.
METRICS_CONTENT_TYPE: str = exposition.CONTENT_TYPE_LATEST

# vLLM's own bucket boundaries, so dashboards built for vLLM read the simulator alike.
_TTFT_BUCKETS = (
    0.001,
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
    160.0,
    640.0,
    2560.0,
)
_TPOT_BUCKETS = (
    0.01,
    0.025,
    0.05,
    0.075,
    0.1,
    0.15,
    0.2,
    0.3,
    0.4,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
)
_E2E_BUCKETS = (
    0.3,
    0.5,
    0.8,
    1.0,
    1.5,
    2.0,
    2.5,
    5.0,
    10.0,
    15.0,
    20.0,
    30.0,
    40.0,
    50.0,
    60.0,
    120.0,
    240.0,
    480.0,
    960.0,
    1920.0,
    7680.0,
)

FINISH_REASONS = ("stop", "length", "abort")
# vLLM's buckets for its sleep-mode operations (vllm/entrypoints/serve/dev/sleep/metrics.py).
_SLEEP_OPERATION_BUCKETS = (0.01, 0.1, 1, 10, 30, 60, 120, 300, 600)


class SleepMemory(Protocol):
    """What the simulated sleep mode reports (``simulator.sleep.SleepMode``)."""

    @property
    def level(self) -> int:
        """The sleep level while a tag is asleep, else 0."""
        ...

    @property
    def allocated_bytes(self) -> int:
        """Simulated GPU memory held now, per GPU."""
        ...

    @property
    def freed_bytes(self) -> int:
        """Simulated GPU memory freed by sleep, per GPU."""
        ...

    @property
    def cpu_backup_bytes(self) -> int:
        """Host RAM holding the weights of a level-1 sleep."""
        ...


@dataclass(slots=True)
class SimulatorStats:
    """Plain counters served at ``GET /simulator/stats``.

    ``aborted_total`` counts requests whose client went away before the answer was
    complete (a stalled stream the client gave up on included); ``failed_total``
    counts injected failures (error events, dropped connections, forced statuses);
    ``rejected_total`` counts requests refused before generation (bad input,
    unknown model, sleeping engine, missing API key).
    """

    requests_total: int = 0
    running: int = 0
    completed_total: int = 0
    aborted_total: int = 0
    failed_total: int = 0
    rejected_total: int = 0
    prompt_tokens_total: int = 0
    generation_tokens_total: int = 0
    reserved_tokens: int = 0
    #: Requests counted in ``requests_total``, by the path they came on.
    requests_by_path: dict[str, int] = field(default_factory=dict)

    def count_path(self, path: str) -> None:
        """Count one request on ``path``."""
        self.requests_by_path[path] = self.requests_by_path.get(path, 0) + 1

    def as_dict(self) -> dict[str, object]:
        """The counters as a JSON-ready dict (without the internal KV reservation)."""
        data = asdict(self)
        del data["reserved_tokens"]
        return data

    def reset(self) -> None:
        """Zero the totals; what is running right now stays as it is."""
        self.requests_total = 0
        self.completed_total = 0
        self.aborted_total = 0
        self.failed_total = 0
        self.rejected_total = 0
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0
        self.requests_by_path = {}


class SimulatorMetrics:
    """vLLM-named Prometheus series in a registry of their own (never the global one)."""

    def __init__(
        self,
        model_name: str,
        running: Callable[[], float],
        kv_usage: Callable[[], float],
        sleep: SleepMemory,
        gpu_memory_bytes: int,
    ) -> None:
        """Register every series, labelled ``model_name``; gauges read the callables and
        `sleep`."""
        self.registry = CollectorRegistry()
        reg = self.registry
        label = ("model_name",)
        Gauge(
            "vllm:num_requests_running",
            "Requests in model execution batches (simulated).",
            label,
            registry=reg,
        ).labels(model_name).set_function(running)
        Gauge(
            "vllm:num_requests_waiting",
            "Requests waiting to be processed (simulated).",
            label,
            registry=reg,
        ).labels(model_name).set(0)
        for name in ("vllm:gpu_cache_usage_perc", "vllm:kv_cache_usage_perc"):
            Gauge(
                name, "KV-cache usage, 1 means 100 percent (simulated).", label, registry=reg
            ).labels(model_name).set_function(kv_usage)
        self.prompt_tokens = Counter(
            "vllm:prompt_tokens", "Prefill tokens processed (simulated).", label, registry=reg
        ).labels(model_name)
        self.generation_tokens = Counter(
            "vllm:generation_tokens",
            "Generation tokens processed (simulated).",
            label,
            registry=reg,
        ).labels(model_name)
        success = Counter(
            "vllm:request_success",
            "Successfully processed requests (simulated).",
            ("model_name", "finished_reason"),
            registry=reg,
        )
        self.success = {reason: success.labels(model_name, reason) for reason in FINISH_REASONS}
        self.aborted = Counter(
            "vllm:request_aborted",
            "Requests aborted because the client went away (simulated).",
            label,
            registry=reg,
        ).labels(model_name)
        self.failed = Counter(
            "vllm:request_failed",
            "Requests failed by injected faults (simulated).",
            label,
            registry=reg,
        ).labels(model_name)
        self.ttft = Histogram(
            "vllm:time_to_first_token_seconds",
            "Time to first token in seconds (simulated).",
            label,
            registry=reg,
            buckets=_TTFT_BUCKETS,
        ).labels(model_name)
        self.tpot = Histogram(
            "vllm:time_per_output_token_seconds",
            "Time per output token in seconds (simulated).",
            label,
            registry=reg,
            buckets=_TPOT_BUCKETS,
        ).labels(model_name)
        self.e2e = Histogram(
            "vllm:e2e_request_latency_seconds",
            "End-to-end request latency in seconds (simulated).",
            label,
            registry=reg,
            buckets=_E2E_BUCKETS,
        ).labels(model_name)
        self._register_sleep(model_name, sleep, gpu_memory_bytes)

    def _register_sleep(self, model_name: str, sleep: SleepMemory, claim: int) -> None:
        """The simulated GPU memory (per GPU of the engine's set, as the gateway's ledger counts
        it) and vLLM's own sleep-operation histogram."""
        reg, label = self.registry, ("model_name",)
        gauges: tuple[tuple[str, str, Callable[[], float]], ...] = (
            (
                "simulator_gpu_memory_claimed_bytes",
                "GPU memory the engine holds awake, per GPU (--gpu-memory-bytes).",
                lambda: float(claim),
            ),
            (
                "simulator_gpu_memory_allocated_bytes",
                "GPU memory held now, per GPU: the claim awake, the residual asleep (simulated).",
                lambda: float(sleep.allocated_bytes),
            ),
            (
                "simulator_gpu_memory_freed_by_sleep_bytes",
                "GPU memory sleep has freed and that is still free, per GPU (simulated).",
                lambda: float(sleep.freed_bytes),
            ),
            (
                "simulator_cpu_memory_weights_backup_bytes",
                "Host RAM holding the weights during a level-1 sleep (simulated).",
                lambda: float(sleep.cpu_backup_bytes),
            ),
            (
                "simulator_sleep_level",
                "0 awake; 1 or 2 while anything sleeps (simulated).",
                lambda: float(sleep.level),
            ),
        )
        for name, documentation, read in gauges:
            Gauge(name, documentation, label, registry=reg).labels(model_name).set_function(read)
        self.sleep_operations = Histogram(
            "vllm:sleep_mode_operation_duration_seconds",
            "Duration of one sleep-mode operation (simulated).",
            ("operation",),
            registry=reg,
            buckets=_SLEEP_OPERATION_BUCKETS,
        )

    def observe_finished(
        self,
        finish_reasons: list[str],
        generation_tokens: int,
        ttft: float | None,
        e2e: float,
    ) -> None:
        """Record a request that ran to completion."""
        if generation_tokens:
            self.generation_tokens.inc(generation_tokens)
        for reason in finish_reasons:
            self.success[reason].inc()
        self._observe_latency(generation_tokens, ttft, e2e)

    def observe_interrupted(
        self, aborted: bool, generation_tokens: int, ttft: float | None, e2e: float
    ) -> None:
        """Record a request cut short: by its client (``aborted``) or by an injected fault."""
        if generation_tokens:
            self.generation_tokens.inc(generation_tokens)
        if aborted:
            self.aborted.inc()
            self.success["abort"].inc()
        else:
            self.failed.inc()
        self._observe_latency(generation_tokens, ttft, e2e)

    def _observe_latency(self, generation_tokens: int, ttft: float | None, e2e: float) -> None:
        if ttft is not None:
            self.ttft.observe(ttft)
            if generation_tokens > 1:
                self.tpot.observe(max(e2e - ttft, 0.0) / (generation_tokens - 1))
        self.e2e.observe(e2e)

    def render(self) -> bytes:
        """The Prometheus text exposition of every series."""
        return generate_latest(self.registry)
