"""The Runtime protocol every engine backend implements, and the spec it runs."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

# Labels that mark a container (or a process state file) as an engine of ours.
LABEL_MANAGED = "io.vllm-chat-gateway.managed"
LABEL_PROFILE = "io.vllm-chat-gateway.profile"
LABEL_INSTANCE = "io.vllm-chat-gateway.instance"
LABEL_SERVED_NAME = "io.vllm-chat-gateway.served-model-name"

# The variable an engine the gateway starts reads its API key from: vLLM's own (it then answers
# 401 on /v1/* without `Authorization: Bearer <key>`; the simulator does the same). Passed in the
# engine's environment, not its argv, which every local user can read in `ps`.
ENGINE_API_KEY_ENV = "VLLM_API_KEY"


class RuntimeError_(Exception):  # the builtin name is taken
    """A runtime could not do what it was asked; the message says why."""


@dataclass(frozen=True)
class EngineSpec:
    """Everything a runtime needs to run one engine, built only from a validated profile.

    Nothing here comes from a request body: request input selects a profile id, and the
    profile (validated at load time) supplies image, arguments, volumes and environment.
    """

    profile_id: str
    served_model_name: str
    runtime: str  # "docker" | "process" | "external" | "ray"
    aliases: tuple[str, ...] = ()
    # process: the full argv; docker: the arguments given to the image's entrypoint.
    command: tuple[str, ...] = ()
    image: str | None = None
    env: dict[str, str] = field(default_factory=dict)
    # Host port on 127.0.0.1 the engine answers on (process: it listens there itself).
    port: int | None = None
    container_port: int = 8000
    # external: the engine's URL (an OpenAI base URL ending in /v1 is accepted).
    base_url: str | None = None
    # docker: the GPU indices to hand to the container; empty means no GPU request at all.
    gpu_ids: tuple[int, ...] = ()
    # docker: host path or named volume -> container path (read-write unless listed in ro).
    volumes: dict[str, str] = field(default_factory=dict)
    read_only_volumes: frozenset[str] = frozenset()
    shm_size: str = "8g"
    ipc_host: bool = True
    health_path: str = "/health"
    startup_timeout_s: float = 600.0
    # The Bearer key every request to the engine carries. Process and docker engines: a random key
    # made for this start, which the runtime puts in the engine's environment (ENGINE_API_KEY_ENV);
    # external engines: VLLM_API_KEY of the settings. Kept out of repr (and so out of logs).
    api_key: str | None = field(default=None, repr=False)
    # The environment variables the engine reads its key from (vLLM and the simulator:
    # VLLM_API_KEY; llama.cpp's servers: LLAMA_API_KEY, llama-cpp-python's API_KEY).
    api_key_env: tuple[str, ...] = (ENGINE_API_KEY_ENV,)
    # Extra labels (the runtime adds the managed/profile/instance labels itself).
    labels: dict[str, str] = field(default_factory=dict)
    # process: where the engine's output is written (a ring buffer is kept as well).
    log_path: Path | None = None
    # ray: the Ray node the engine runs on, its GPUs' indices on that node (gpu_ids are the
    # cluster-wide ones the ledger uses) and its share of each (gpu_memory_utilization).
    node_id: str | None = None
    node_gpu_ids: tuple[int, ...] = ()
    gpu_share: float = 0.0
    # ray: how the node's engine actor runs it ("process", or "docker": a container through
    # that node's Docker, from `image`).
    node_runtime: str = "process"


@dataclass(frozen=True)
class RuntimeHandle:
    """A running engine: an id the runtime understands and the engine's root URL."""

    runtime: str
    id: str
    base_url: str
    profile_id: str = ""
    # The key the engine was started with (read back from the runtime's records on adoption, so a
    # restarted gateway can still call it); None for an engine started without one.
    api_key: str | None = field(default=None, repr=False)
    # ray: the node it runs on, its GPUs' indices there and the engine's pid on that node.
    node_id: str = ""
    node_gpu_ids: tuple[int, ...] = ()
    pid: int | None = None


def engine_key_env(spec: EngineSpec) -> dict[str, str]:
    """The part of an engine's environment that carries its API key (empty without a key)."""
    if not spec.api_key:
        return {}
    return dict.fromkeys(spec.api_key_env, spec.api_key)


class Runtime(Protocol):
    """Start, stop, watch and adopt engines of one kind."""

    name: str

    async def start(self, spec: EngineSpec) -> RuntimeHandle:
        """Launch the engine; return once launched (readiness is checked by the manager)."""
        ...

    async def stop(self, handle: RuntimeHandle, *, timeout_s: float = 20.0) -> None:
        """Stop the engine gracefully; force it after the timeout; remove what it leaves."""
        ...

    async def is_running(self, handle: RuntimeHandle) -> bool:
        """False once the engine has exited."""
        ...

    def logs_tail(self, handle: RuntimeHandle, lines: int = 50) -> list[str]:
        """The last lines the engine printed."""
        ...

    async def adopt(self) -> list[RuntimeHandle]:
        """Engines of ours (this instance) that are already running, e.g. after a restart."""
        ...
