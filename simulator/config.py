"""Configuration of the vLLM engine simulator."""

from __future__ import annotations

from dataclasses import dataclass

#: ``owned_by`` reported for every simulated model, so nobody mistakes it for a real engine.
SIMULATOR_OWNER = "vllm-chat-gateway-simulator"

#: Version reported by ``GET /version`` (a PEP 440 local version, clearly not a vLLM release).
SIMULATOR_VERSION = "0.0.0+simulator"

#: GPU memory a sleeping engine keeps on each GPU (its CUDA context): vLLM reports 1.2 to 4.8
#: GiB still in use after a sleep; the gateway's placement counts the same default figure.
DEFAULT_SLEEP_RESIDUAL_BYTES = 3 * 1024**3 // 2

#: The APIs ``--without-api`` can take away, each with the routes it removes, so the
#: simulator can stand for an engine that does not serve them (its routes answer 404).
OPTIONAL_APIS: dict[str, tuple[str, ...]] = {
    "chat": ("/v1/chat/completions",),
    "completions": ("/v1/completions",),
    "embeddings": ("/v1/embeddings",),
    "responses": ("/v1/responses",),
    "messages": ("/v1/messages", "/v1/messages/count_tokens"),
    "tokenize": ("/tokenize", "/detokenize"),
    "rerank": ("/rerank", "/v1/rerank", "/v2/rerank"),
    "score": ("/score", "/v1/score"),
    "transcriptions": ("/v1/audio/transcriptions",),
}


@dataclass(frozen=True, slots=True)
class SimulatorConfig:
    """Everything that shapes one simulated engine.

    ``model`` is the "model path" (vLLM's ``--model``); ``served_model_names`` are the
    names clients may use (vLLM's ``--served-model-name``), defaulting to ``model``.
    Fault settings (``*_after_chunks``) apply to every streamed response; ``None``
    disables them. ``die_after_chunks`` terminates the whole process. ``test_routes`` turns
    on what only tests may use: the ``/simulator/*`` routes (counters, the log of recent
    request bodies, reset) and the per-request ``X-Simulator-*`` fault headers; without it
    the simulator keeps no request body once it has answered.

    The sleep contract (``simulator/sleep.py``): ``sleep_delay_s`` and ``wake_delay_s`` are how
    long falling asleep and waking the weights (or reloading them) take; ``gpu_memory_bytes``
    is the claim it runs with on each GPU of its set, of which ``sleep_residual_bytes`` stays
    while it sleeps and ``weights_bytes`` are the weights (0: half of what sleep frees).
    ``fail_sleep`` and ``fail_wake`` make those calls fail (500), as a sleep or a wake that
    goes wrong in vLLM does.
    """

    model: str = "simulated-model"
    served_model_names: tuple[str, ...] = ()
    host: str = "127.0.0.1"
    port: int = 8000
    startup_delay: float = 0.0
    tokens_per_second: float = 0.0
    first_token_delay: float = 0.0
    fail_at_start: bool = False
    die_after_chunks: int | None = None
    # Exit abruptly this long after it starts serving (an engine that crashes soon after start).
    die_after_seconds: float | None = None
    error_after_chunks: int | None = None
    stall_after_chunks: int | None = None
    max_model_len: int = 4096
    embedding_dim: int = 64
    api_key: str | None = None
    response_tokens: int = 0
    kv_cache_tokens: int = 0
    log_level: str = "info"
    test_routes: bool = False
    sleep_delay_s: float = 0.0
    wake_delay_s: float = 0.0
    gpu_memory_bytes: int = 0
    sleep_residual_bytes: int = DEFAULT_SLEEP_RESIDUAL_BYTES
    weights_bytes: int = 0
    # Faults of the sleep contract: POST /sleep (or /wake_up) answers 500 and changes nothing.
    fail_sleep: bool = False
    fail_wake: bool = False
    # APIs it does not serve (keys of OPTIONAL_APIS): their routes are 404, as on an engine
    # without them.
    without_apis: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        """Reject impossible settings early, with a message naming the setting."""
        if not self.model:
            raise ValueError("model must not be empty")
        if any(not name for name in self.served_model_names):
            raise ValueError("served model names must not be empty")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in 0..65535, got {self.port}")
        for name in (
            "startup_delay",
            "tokens_per_second",
            "first_token_delay",
            "sleep_delay_s",
            "wake_delay_s",
            "gpu_memory_bytes",
            "sleep_residual_bytes",
            "weights_bytes",
        ):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0")
        room = self.gpu_memory_bytes - min(self.sleep_residual_bytes, self.gpu_memory_bytes)
        if self.weights_bytes > room:
            raise ValueError(
                f"weights_bytes ({self.weights_bytes}) must fit in gpu_memory_bytes less "
                f"sleep_residual_bytes ({room})"
            )
        if self.die_after_seconds is not None and self.die_after_seconds < 0:
            raise ValueError("die_after_seconds must be >= 0")
        for name in ("die_after_chunks", "error_after_chunks", "stall_after_chunks"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ValueError(f"{name} must be >= 0")
        if self.max_model_len < 1:
            raise ValueError("max_model_len must be >= 1")
        if self.embedding_dim < 1:
            raise ValueError("embedding_dim must be >= 1")
        unknown = sorted(self.without_apis - OPTIONAL_APIS.keys())
        if unknown:
            raise ValueError(
                f"unknown API(s) {', '.join(unknown)}; choose from {', '.join(OPTIONAL_APIS)}"
            )
        if self.response_tokens < 0 or self.kv_cache_tokens < 0:
            raise ValueError("response_tokens and kv_cache_tokens must be >= 0")

    @property
    def model_names(self) -> tuple[str, ...]:
        """Names the simulated engine answers to; the first one is the default."""
        return self.served_model_names or (self.model,)

    @property
    def primary_name(self) -> str:
        """The name used in metrics labels and for requests that name no model."""
        return self.model_names[0]

    @property
    def kv_capacity_tokens(self) -> int:
        """Size of the pretend KV cache, in tokens, for the cache-usage gauges."""
        return self.kv_cache_tokens or self.max_model_len * 16
