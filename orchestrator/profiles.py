"""The schema of ``model_profiles.yml``: which models the gateway can run, and how.

The file is plain data (no anchors, no aliases, no duplicate keys) validated by the pydantic
models below. Every error names the file, the profile and the field, e.g.
``model_profiles.yml: profile 'llama-3-8b': vllm.gpu_memory_utilization: Input should be less
than or equal to 1``. ``orchestrator/model_profiles.schema.json`` is this schema exported
(``python -m orchestrator.profiles schema``) for editors; a test keeps it current.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path, PurePosixPath
from types import MappingProxyType
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic.json_schema import SkipJsonSchema
from pydantic_core import ErrorDetails

PROFILE_ID_PATTERN = r"^[a-z0-9][a-z0-9._-]{0,63}$"
SERVED_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}$"
# An HF repo id ("org/name" or "name"), an absolute path, or a path under the home directory.
MODEL_PATTERN = r"^([A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?|[/~].*)$"
ENV_NAME_PATTERN = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# A pinned image: name with a tag (never "latest") and/or a digest.
IMAGE_PATTERN = re.compile(
    r"^(?P<name>[a-z0-9][a-z0-9._/-]*(:[0-9]+/[a-z0-9._/-]+)?)"
    r"(:(?P<tag>[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}))?(@sha256:(?P<digest>[0-9a-f]{64}))?$"
)
NAMED_VOLUME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
HF_CACHE_CONTAINER_PATH = "/root/.cache/huggingface"

# Environment variables a profile may not set: they change what code the engine loads, carry
# secrets that belong in the gateway's settings, or override the planner's GPU choice.
FORBIDDEN_ENV = {
    "PATH": "it changes which programs the engine runs",
    "PYTHONPATH": "it changes which code the engine imports",
    "PYTHONHOME": "it changes which code the engine imports",
    "PYTHONSTARTUP": "it runs code in the engine",
    "BASH_ENV": "it runs code in the engine's shells",
    "ENV": "it runs code in the engine's shells",
    "HF_TOKEN": "secrets come from the gateway's settings (HF_TOKEN), never from this file",
    "HUGGING_FACE_HUB_TOKEN": "secrets come from the gateway's settings, never from this file",
    "CUDA_VISIBLE_DEVICES": "the planner chooses the GPUs",
    "VLLM_SERVER_DEV_MODE": "the gateway sets it for a vllm profile with sleep_level 1 or 2 "
    "(it serves vLLM's development endpoints)",
}
FORBIDDEN_ENV_PREFIXES = {
    "LD_": "it changes what code the engine process loads",
    "DYLD_": "it changes what code the engine process loads",
}
# Flags a profile sets through its own fields (or never): refused inside vllm.extra_args.
FIELD_FLAGS = {
    "--model": "model",
    "--port": "the gateway",
    "--host": "the gateway",
    "--served-model-name": "served_model_name and aliases",
    "--tensor-parallel-size": "vllm.tensor_parallel_size",
    "-tp": "vllm.tensor_parallel_size",
    "--pipeline-parallel-size": "vllm.pipeline_parallel_size",
    "-pp": "vllm.pipeline_parallel_size",
    "--distributed-executor-backend": "vllm.pipeline_parallel_size (across nodes: ray)",
    "--max-model-len": "vllm.max_model_len",
    "--gpu-memory-utilization": "vllm.gpu_memory_utilization",
    "--dtype": "vllm.dtype",
    "--quantization": "quantization",
    "-q": "quantization",
    "--kv-cache-dtype": "vllm.kv_cache_dtype",
    "--api-key": "the gateway (engine keys never live in this file)",
    "--trust-remote-code": "trust_remote_code: true",
    "--enable-sleep-mode": "sleep_level",
    "--no-enable-sleep-mode": "sleep_level",
}
# PyTorch's allocator settings under each name torch reads (the accelerator-agnostic one, CUDA's,
# ROCm's). With expandable segments on, vLLM's sleep mode freed nothing in the versions that did
# not switch them off around its memory pool (vllm-project/vllm#11743, pytorch#147851).
ALLOC_CONF_ENV = ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_HIP_ALLOC_CONF")
FORBIDDEN_HOST_PATHS = frozenset(
    {"/", "/var/run/docker.sock", "/run/docker.sock", "/proc", "/sys", "/dev", "/etc", "/boot"}
)

DEFAULT_STARTUP_TIMEOUT_S = {
    "vllm": 900.0,
    "llama_cpp": 600.0,
    "simulator": 60.0,
    "command": 300.0,
    "external": 60.0,
}
# llama.cpp flags a profile sets through fields (both servers' spellings: llama.cpp's own
# llama-server and llama-cpp-python's), so extra_args cannot set them twice or around the
# gateway.
LLAMA_CPP_FIELD_FLAGS = {
    "--model": "model (and llama_cpp.gguf_file)",
    "-m": "model (and llama_cpp.gguf_file)",
    "--hf-repo": "model", "-hf": "model", "-hfr": "model", "--hf-file": "llama_cpp.gguf_file",
    "--host": "the gateway",
    "--port": "the gateway",
    "--api-key": "the gateway (engine keys never live in this file)",
    "--api_key": "the gateway (engine keys never live in this file)",
    "--api-key-file": "the gateway (engine keys never live in this file)",
    "--model_alias": "served_model_name", "--alias": "served_model_name", "-a": "served_model_name",
    "--n_ctx": "llama_cpp.n_ctx", "--ctx-size": "llama_cpp.n_ctx", "-c": "llama_cpp.n_ctx",
    "--n_gpu_layers": "llama_cpp.n_gpu_layers", "--n-gpu-layers": "llama_cpp.n_gpu_layers",
    "--gpu-layers": "llama_cpp.n_gpu_layers", "-ngl": "llama_cpp.n_gpu_layers",
    "--tensor_split": "the planner", "--tensor-split": "the planner", "-ts": "the planner",
    "--parallel": "llama_cpp.parallel", "-np": "llama_cpp.parallel",
    "--ssl_keyfile": "the gateway", "--ssl_certfile": "the gateway",
    "--ssl-key-file": "the gateway", "--ssl-cert-file": "the gateway",
    "--config_file": "the profile (a config file could set anything above)",
}  # fmt: skip


class Engine(StrEnum):
    """What serves the model."""

    VLLM = "vllm"
    LLAMA_CPP = "llama_cpp"
    SIMULATOR = "simulator"
    COMMAND = "command"
    EXTERNAL = "external"


class RuntimeKind(StrEnum):
    """Where the engine runs."""

    DOCKER = "docker"
    PROCESS = "process"
    EXTERNAL = "external"


class EngineApi(StrEnum):
    """An engine API beyond chat, completions and embeddings (which every engine serves)."""

    RESPONSES = "responses"  # POST /v1/responses
    MESSAGES = "messages"  # Anthropic's POST /v1/messages and /v1/messages/count_tokens
    TOKENIZE = "tokenize"  # POST /tokenize and /detokenize
    RERANK = "rerank"  # POST /v1/rerank
    SCORE = "score"  # POST /v1/score
    TRANSCRIPTIONS = "transcriptions"  # POST /v1/audio/transcriptions


# What an engine serves when its profile does not say: vLLM (and the simulator, which implements
# vLLM's routes) all of them, a command or an external server none (Anthropic's route is then
# translated to chat completions by the gateway; the others are refused).
DEFAULT_APIS = {
    "vllm": frozenset(EngineApi),
    "llama_cpp": frozenset[EngineApi](),
    "simulator": frozenset(EngineApi),
    "command": frozenset[EngineApi](),
    "external": frozenset[EngineApi](),
}


class Quantization(StrEnum):
    """Weight format; also what the planner uses for bytes per parameter."""

    NONE = "none"
    AWQ = "awq"
    AWQ_MARLIN = "awq_marlin"
    GPTQ = "gptq"
    GPTQ_MARLIN = "gptq_marlin"
    FP8 = "fp8"


class ProfileError(Exception):
    """The profiles file is unreadable or invalid; each line names file, profile and field."""

    def __init__(self, path: Path | str, problems: Sequence[str]) -> None:
        self.path = str(path)
        self.problems = tuple(problems)
        super().__init__("\n".join(f"{self.path}: {problem}" for problem in self.problems))


class UnknownProfileError(LookupError):
    """No profile has that id."""


def _check_parallel_size(value: object) -> object:
    if value == "auto" or (isinstance(value, int) and not isinstance(value, bool) and value >= 1):
        return value
    raise ValueError(f"must be 'auto' or a whole number >= 1, not {value!r}")


ParallelSize = Annotated[
    Annotated[int, Field(ge=1)] | Literal["auto"], BeforeValidator(_check_parallel_size)
]


class Architecture(BaseModel):
    """Facts from the model's config.json that the VRAM planner needs."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    params_b: float = Field(gt=0, description="Parameter count in billions.")
    layers: int = Field(ge=1, description="num_hidden_layers")
    attention_heads: int = Field(ge=1, description="num_attention_heads")
    kv_heads: int = Field(ge=1, description="num_key_value_heads (= attention_heads without GQA)")
    head_dim: int = Field(ge=1, description="head_dim, else hidden_size / num_attention_heads")
    max_context: int = Field(ge=1, description="max_position_embeddings (the trained context)")
    hidden_size: int | None = Field(default=None, ge=1)

    @model_validator(mode="after")
    def _heads_group_evenly(self) -> Architecture:
        if self.attention_heads % self.kv_heads:
            raise ValueError(
                f"kv_heads: {self.kv_heads} does not divide attention_heads "
                f"{self.attention_heads} (grouped-query attention needs it to)"
            )
        return self


class VllmArgs(BaseModel):
    """vLLM engine arguments that the gateway sets from the profile (and the plan)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    tensor_parallel_size: ParallelSize = Field(
        default="auto", description="'auto': the planner picks the smallest that fits."
    )
    pipeline_parallel_size: ParallelSize = Field(
        default=1,
        description="Nodes (pipeline stages) the engine spans: 1 never spans nodes; 'auto': "
        "the planner picks the fewest that fit. vllm and simulator engines only.",
    )
    max_model_len: int | None = Field(
        default=None, ge=1, description="Context to serve; default: architecture.max_context."
    )
    gpu_memory_utilization: float = Field(default=0.90, gt=0, le=1)
    dtype: Literal["auto", "float16", "bfloat16", "float32"] = "auto"
    kv_cache_dtype: Literal["auto", "fp8"] = "auto"
    extra_args: tuple[str, ...] = Field(
        default=(), description="More vLLM flags; never ones the profile sets through fields."
    )
    device: Literal["gpu", "cpu"] = "gpu"

    @field_validator("extra_args")
    @classmethod
    def _no_field_flags(cls, args: tuple[str, ...]) -> tuple[str, ...]:
        for arg in args:
            if not arg or any(c in arg for c in "\0\n\r"):
                raise ValueError(f"{arg!r}: empty or multi-line arguments are not allowed")
            flag = arg.split("=", 1)[0]
            # vLLM's parser accepts --max_model_len for --max-model-len.
            normal = "--" + flag[2:].replace("_", "-") if flag.startswith("--") else flag
            if normal in FIELD_FLAGS:
                raise ValueError(f"{flag} is set through {FIELD_FLAGS[normal]}, not extra_args")
        return args


# Environment variables the llama.cpp servers read their address, key or whole configuration
# from (llama-cpp-python's settings, llama-server's LLAMA_ARG_*): the gateway's alone.
LLAMA_CPP_GATEWAY_ENV = frozenset(
    {
        "HOST", "PORT", "API_KEY", "CONFIG_FILE", "MODEL",
        "LLAMA_API_KEY", "LLAMA_ARG_HOST", "LLAMA_ARG_PORT", "LLAMA_ARG_MODEL",
        "LLAMA_ARG_API_KEY_FILE",
    }
)  # fmt: skip
# GGUF file types the planner sizes a file that is not here by (llama.cpp's quantize names).
GgufType = Literal["Q4_K_M", "Q5_K_M", "Q6_K", "Q8_0", "F16", "BF16", "F32"]


class LlamaCppArgs(BaseModel):
    """llama.cpp server arguments that the gateway sets from the profile (and the plan)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    gguf_file: str | None = Field(
        default=None,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._/-]*\.gguf$",
        description="The .gguf file in the Hugging Face repo `model` (fetched into the HF "
        "cache); a local `model` is the .gguf file's path itself.",
    )
    gguf_type: GgufType | None = Field(
        default=None,
        description="The file's quantization, for sizing it before it is downloaded (a file "
        "that is here is sized from its own header).",
    )
    n_ctx: int | None = Field(
        default=None, ge=1, description="Context (tokens, all slots); default: max_context."
    )
    parallel: int = Field(default=1, ge=1, le=64, description="Parallel slots (requests).")
    n_gpu_layers: int = Field(
        default=-1, ge=-1, description="Layers on the GPU: -1 all (the planner may offload fewer)."
    )
    device: Literal["gpu", "cpu"] = "gpu"
    extra_args: tuple[str, ...] = Field(
        default=(), description="More server flags; never ones the profile sets through fields."
    )

    @field_validator("extra_args")
    @classmethod
    def _no_field_flags(cls, args: tuple[str, ...]) -> tuple[str, ...]:
        for arg in args:
            if not arg or any(c in arg for c in "\0\n\r"):
                raise ValueError(f"{arg!r}: empty or multi-line arguments are not allowed")
            flag = arg.split("=", 1)[0]
            if flag in LLAMA_CPP_FIELD_FLAGS:
                raise ValueError(
                    f"{flag} is set through {LLAMA_CPP_FIELD_FLAGS[flag]}, not extra_args"
                )
        return args


class Profile(BaseModel):
    """One model the gateway can run: engine, runtime, arguments and hardware facts."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # Filled in from the profile's key under `profiles`; not written in the file.
    id: SkipJsonSchema[str] = ""
    display_name: str = Field(min_length=1)
    description: str = ""
    engine: Engine
    runtime: RuntimeKind
    model: Annotated[str, StringConstraints(pattern=MODEL_PATTERN)] | None = Field(
        default=None, description="HF repo id or local directory (a leading ~ is expanded)."
    )
    image: str | None = Field(default=None, description="docker: a pinned image, never latest.")
    served_model_name: Annotated[str, StringConstraints(pattern=SERVED_NAME_PATTERN)]
    aliases: tuple[Annotated[str, StringConstraints(pattern=SERVED_NAME_PATTERN)], ...] = ()
    architecture: Architecture | None = None
    quantization: Quantization = Quantization.NONE
    trust_remote_code: bool = False
    vllm: VllmArgs = VllmArgs()
    llama_cpp: LlamaCppArgs = LlamaCppArgs()
    env: dict[str, str] = Field(default_factory=dict)
    command: tuple[str, ...] = Field(
        default=(), description="engine command: argv; '{port}' is replaced by the port."
    )
    base_url: str | None = Field(default=None, description="external: http(s) URL.")
    startup_timeout_s: float | None = Field(
        default=None, gt=0, description="Default: vllm 900, simulator 60, command 300."
    )
    volumes: dict[str, str] = Field(
        default_factory=dict, description="docker: host path or named volume -> container path."
    )
    read_only_volumes: tuple[str, ...] = Field(
        default=(),
        description="docker: sources (keys of volumes) mounted read-only, e.g. model dirs.",
    )
    apis: tuple[EngineApi, ...] | None = Field(
        default=None,
        description="The engine's APIs beyond chat, completions and embeddings. Default: all "
        "for vllm and simulator engines, none for command and external ones (Anthropic's "
        "messages are then translated to chat completions; the other routes are refused).",
    )
    tags: tuple[str, ...] = ()
    recommended_for: tuple[str, ...] = ()
    # The fleet: how this engine shares the GPUs with others (orchestrator/placement.py).
    pinned: bool = Field(default=False, description="Never evicted to make room for another.")
    idle_ttl_s: float | None = Field(
        default=None, gt=0, description="Sleep (or stop) the engine after this long unused."
    )
    sleep_level: Literal[0, 1, 2] = Field(
        default=0,
        description="0: evicting stops the engine; 1 or 2: vLLM sleep mode (level 1 keeps the "
        "weights in host RAM, level 2 drops them). vLLM and simulator engines only; a vllm "
        "engine then starts with --enable-sleep-mode and VLLM_SERVER_DEV_MODE=1 (GPU only).",
    )
    max_concurrency: int | None = Field(
        default=None,
        ge=1,
        le=4096,
        description="The engine's local slots (default: MAX_QUEUE_SIZE).",
    )
    priority: int = Field(
        default=0, ge=-100, le=100, description="Higher stays resident longer under pressure."
    )

    @property
    def uses_gpu(self) -> bool:
        """Whether the planner must find GPU memory for this profile (a simulator or command
        engine that declares an architecture is sized and placed as the model it stands in
        for)."""
        if self.engine is Engine.LLAMA_CPP:
            return self.llama_cpp.device == "gpu" and self.llama_cpp.n_gpu_layers != 0
        if self.vllm.device != "gpu":
            return False
        return self.engine is Engine.VLLM or (
            self.engine in (Engine.COMMAND, Engine.SIMULATOR) and self.architecture is not None
        )

    @property
    def served_apis(self) -> frozenset[EngineApi]:
        """`apis`, else the engine's default."""
        if self.apis is not None:
            return frozenset(self.apis)
        return DEFAULT_APIS[self.engine.value]

    @property
    def served_names(self) -> tuple[str, ...]:
        """The served model name followed by the aliases."""
        return (self.served_model_name, *self.aliases)

    @property
    def max_model_len(self) -> int | None:
        """The context to serve: vllm.max_model_len (llama_cpp.n_ctx), else the model's trained
        context."""
        if self.engine is Engine.LLAMA_CPP and self.llama_cpp.n_ctx is not None:
            return self.llama_cpp.n_ctx
        if self.vllm.max_model_len is not None:
            return self.vllm.max_model_len
        return self.architecture.max_context if self.architecture else None

    @property
    def startup_timeout(self) -> float:
        """startup_timeout_s, else the engine's default."""
        return self.startup_timeout_s or DEFAULT_STARTUP_TIMEOUT_S[self.engine.value]

    @property
    def is_local_model(self) -> bool:
        """True when `model` is a directory rather than an HF repo id."""
        return self.model is not None and self.model.startswith(("/", "~"))

    @field_validator("env")
    @classmethod
    def _safe_env(cls, env: dict[str, str]) -> dict[str, str]:
        for key in env:
            problem = env_key_problem(key)
            if problem:
                raise ValueError(problem)
        return env

    @field_validator("volumes")
    @classmethod
    def _safe_volumes(cls, volumes: dict[str, str]) -> dict[str, str]:
        for host, container in volumes.items():
            problem = volume_problem(host, container)
            if problem:
                raise ValueError(problem)
        return volumes

    @field_validator("image")
    @classmethod
    def _pinned_image(cls, image: str | None) -> str | None:
        if image is not None:
            problem = image_problem(image)
            if problem:
                raise ValueError(problem)
        return image

    @field_validator("base_url")
    @classmethod
    def _http_url(cls, url: str | None) -> str | None:
        if url is not None:
            problem = base_url_problem(url)
            if problem:
                raise ValueError(problem)
        return url

    @field_validator("model")
    @classmethod
    def _no_parent_dirs(cls, model: str | None) -> str | None:
        if model is not None and ".." in PurePosixPath(model).parts:
            raise ValueError("'..' is not allowed in a model path")
        return model

    @model_validator(mode="after")
    def _fields_agree(self) -> Profile:
        problems = list(cross_field_problems(self))
        if problems:
            raise ValueError("; ".join(problems))
        return self


class ProfilesFile(BaseModel):
    """The whole file: the default profile's id and the profiles by id."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    default: str = Field(description="Id of the profile the gateway starts by default.")
    profiles: dict[Annotated[str, StringConstraints(pattern=PROFILE_ID_PATTERN)], Profile] = Field(
        min_length=1
    )

    @model_validator(mode="before")
    @classmethod
    def _ids_from_keys(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("profiles"), dict):
            profiles = {
                key: {"id": key, **value} if isinstance(value, dict) else value
                for key, value in data["profiles"].items()
            }
            return {**data, "profiles": profiles}
        return data

    @model_validator(mode="after")
    def _consistent(self) -> ProfilesFile:
        problems = [*id_problems(self.profiles), *served_name_problems(self.profiles)]
        if self.default not in self.profiles:
            known = ", ".join(self.profiles)
            problems.append(f"default: {self.default!r} is not one of the profiles ({known})")
        if problems:
            raise ValueError("\n".join(problems))
        return self


def env_key_problem(key: str) -> str | None:
    """Why `key` may not be set in a profile's env, or None."""
    if not ENV_NAME_PATTERN.match(key):
        return f"{key!r} is not a valid environment variable name"
    if key in FORBIDDEN_ENV:
        return f"{key} is not allowed: {FORBIDDEN_ENV[key]}"
    for prefix, why in FORBIDDEN_ENV_PREFIXES.items():
        if key.startswith(prefix):
            return f"{key} is not allowed: {why}"
    return None


def volume_problem(host: str, container: str) -> str | None:
    """Why the docker mount host -> container is refused, or None."""
    if host.startswith("/"):
        path = PurePosixPath(host)
        if ".." in path.parts:
            return f"{host}: '..' is not allowed in a host path"
        if str(path) in FORBIDDEN_HOST_PATHS or path.name == "docker.sock":
            return f"{host}: mounting this host path into an engine is not allowed"
    elif not NAMED_VOLUME_PATTERN.match(host):
        return f"{host}: a volume source must be an absolute host path or a named volume"
    target = PurePosixPath(container)
    if not container.startswith("/") or ".." in target.parts or str(target) == "/":
        return f"{host}: the container path {container!r} must be absolute, not '/', no '..'"
    if str(target) == HF_CACHE_CONTAINER_PATH:
        return f"{host}: {HF_CACHE_CONTAINER_PATH} is the gateway's HF cache mount"
    return None


def image_problem(image: str) -> str | None:
    """Why `image` is not a pinned image reference, or None."""
    match = IMAGE_PATTERN.match(image)
    if not match:
        return f"{image!r} is not an image reference (name:tag or name@sha256:...)"
    if match["tag"] is None and match["digest"] is None:
        return f"{image!r} is not pinned: add a version tag or a digest"
    if match["tag"] == "latest":
        return f"{image!r} is not pinned: 'latest' changes under you; use a version tag"
    return None


def base_url_problem(url: str) -> str | None:
    """Why `url` cannot be an external engine's base URL, or None."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return f"{url!r} must be an http:// or https:// URL with a host"
    if parts.username or parts.password:
        return "credentials in the URL are not allowed (secrets live in the gateway's settings)"
    if parts.query or parts.fragment:
        return f"{url!r}: a base URL has no query or fragment"
    return None


def cross_field_problems(profile: Profile) -> Iterator[str]:
    """Each disagreement between a profile's fields, as 'field: why'."""
    engine, runtime = profile.engine, profile.runtime
    if (engine is Engine.EXTERNAL) != (runtime is RuntimeKind.EXTERNAL):
        yield "runtime: engine external and runtime external go together"
    if engine is Engine.EXTERNAL and profile.base_url is None:
        yield "base_url: required for an external engine"
    if engine is not Engine.EXTERNAL and profile.base_url is not None:
        yield "base_url: only an external engine has one"
    if engine is Engine.COMMAND and not profile.command:
        yield "command: required for engine command"
    if engine is not Engine.COMMAND and profile.command:
        yield "command: only engine command runs a command"
    if engine is Engine.VLLM and profile.model is None:
        yield "model: required for engine vllm"
    yield from llama_cpp_problems(profile)
    yield from pipeline_parallel_problems(profile)
    if profile.uses_gpu and profile.architecture is None:
        yield "architecture: required for a GPU profile (the planner sizes it)"
    if runtime is RuntimeKind.DOCKER and profile.image is None:
        yield "image: required for runtime docker"
    if runtime is not RuntimeKind.DOCKER and profile.image is not None:
        yield "image: only runtime docker uses an image"
    if runtime is not RuntimeKind.DOCKER and profile.volumes:
        yield "volumes: only runtime docker mounts volumes"
    for source in profile.read_only_volumes:
        if source not in profile.volumes:
            yield f"read_only_volumes: {source!r} is not a source (key) of volumes"
    if engine is not Engine.VLLM and profile.quantization is not Quantization.NONE:
        yield "quantization: only engine vllm takes a quantization"
    if engine is not Engine.VLLM and profile.trust_remote_code:
        yield "trust_remote_code: only engine vllm runs remote code"
    if len(set(profile.served_names)) != len(profile.served_names):
        yield "aliases: each served name and alias must be different"
    if profile.sleep_level and engine not in (Engine.VLLM, Engine.SIMULATOR):
        yield "sleep_level: only vllm and simulator engines have a sleep mode"
    if profile.sleep_level and engine is Engine.VLLM:
        yield from sleep_mode_problems(profile)
    arch, wanted = profile.architecture, profile.vllm.max_model_len
    if arch is not None and wanted is not None and wanted > arch.max_context:
        yield (f"vllm.max_model_len: {wanted} is more than the model's context {arch.max_context}")


def llama_cpp_problems(profile: Profile) -> Iterator[str]:
    """Each problem of a llama_cpp profile (or of llama_cpp fields elsewhere), as 'field: why'."""
    if profile.engine is not Engine.LLAMA_CPP:
        if profile.llama_cpp != LlamaCppArgs():
            yield "llama_cpp: only engine llama_cpp takes llama_cpp arguments"
        return
    if profile.model is None:
        yield "model: required for engine llama_cpp (a .gguf path, or a repo with gguf_file)"
    elif profile.is_local_model:
        if not profile.model.endswith(".gguf"):
            yield "model: a local llama_cpp model is the .gguf file's path"
        if profile.llama_cpp.gguf_file is not None:
            yield "llama_cpp.gguf_file: only for a Hugging Face repo `model`"
    elif profile.llama_cpp.gguf_file is None:
        yield "llama_cpp.gguf_file: required with a Hugging Face repo `model`"
    if profile.vllm != VllmArgs():
        yield "vllm: engine llama_cpp takes llama_cpp arguments, not vllm ones"
    for key in sorted(set(profile.env) & LLAMA_CPP_GATEWAY_ENV):
        yield f"env: {key} is the gateway's to set for a llama.cpp server (address, key, config)"
    arch, wanted = profile.architecture, profile.llama_cpp.n_ctx
    if arch is not None and wanted is not None and wanted > arch.max_context:
        yield f"llama_cpp.n_ctx: {wanted} is more than the model's context {arch.max_context}"


def pipeline_parallel_problems(profile: Profile) -> Iterator[str]:
    """Why a profile may not span nodes (`vllm.pipeline_parallel_size` other than 1), as
    'field: why'."""
    if profile.vllm.pipeline_parallel_size == 1:
        return
    if profile.engine not in (Engine.VLLM, Engine.SIMULATOR):
        yield (
            f"vllm.pipeline_parallel_size: engine {profile.engine.value} runs on one node; only "
            "vllm engines (and simulators standing in for them) span nodes"
        )
    elif profile.vllm.device == "cpu":
        yield (
            "vllm.pipeline_parallel_size: a vllm.device cpu profile runs on one node; only GPU "
            "engines span nodes"
        )


def sleep_mode_problems(profile: Profile) -> Iterator[str]:
    """Why a vllm profile cannot run in sleep mode (`sleep_level` 1 or 2), as 'field: why'."""
    if profile.vllm.device == "cpu":
        yield (
            "sleep_level: vLLM's sleep mode is CUDA-only (the CPU build refuses "
            "--enable-sleep-mode); a vllm.device cpu profile takes sleep_level 0 and is stopped "
            "and started cold"
        )
    problem = expandable_segments_problem(profile.env)
    if problem:
        yield f"env: {problem}"


def expandable_segments_problem(env: Mapping[str, str]) -> str | None:
    """Why `env` cannot run a sleep-mode engine (expandable segments on), or None.

    Torch's allocator settings are comma-separated `option:value`; `True` or `1` turns an
    option on (what torch and vLLM's own parser accept, in any case).
    """
    for name in ALLOC_CONF_ENV:
        for option in env.get(name, "").split(","):
            key, _, value = option.partition(":")
            if key.strip() == "expandable_segments" and value.strip().lower() in ("true", "1"):
                return (
                    f"{name}: expandable_segments:True is not allowed with sleep_level 1 or 2 "
                    "(with it, vLLM's sleep mode may free no GPU memory)"
                )
    return None


def id_problems(profiles: Mapping[str, Profile]) -> Iterator[str]:
    """Profiles whose `id` does not match their key (it is set from the key)."""
    for key, profile in profiles.items():
        if profile.id != key:
            yield f"profile {key!r}: id: the key names the profile; remove the id field"


def served_name_problems(profiles: Mapping[str, Profile]) -> Iterator[str]:
    """Served names and aliases that more than one profile claims."""
    owner: dict[str, str] = {}
    for key, profile in profiles.items():
        for index, name in enumerate(profile.served_names):
            field = "served_model_name" if index == 0 else "aliases"
            if name in owner and owner[name] != key:
                yield f"profile {key!r}: {field}: {name!r} is already served by {owner[name]!r}"
            owner.setdefault(name, key)


@dataclass(frozen=True)
class ProfileSet:
    """A validated profiles file: profiles by id, the default, and name lookup."""

    profiles: Mapping[str, Profile]
    default_id: str
    source: str = ""

    @property
    def default(self) -> Profile:
        """The default profile."""
        return self.profiles[self.default_id]

    def get(self, profile_id: str) -> Profile:
        """The profile with this id; UnknownProfileError names the known ones."""
        try:
            return self.profiles[profile_id]
        except KeyError:
            known = ", ".join(self.profiles)
            raise UnknownProfileError(f"no profile {profile_id!r} (known: {known})") from None

    def by_served_name(self, name: str) -> Profile | None:
        """The profile serving `name` as its served model name or an alias."""
        for profile in self.profiles.values():
            if name in profile.served_names:
                return profile
        return None


class _PlainDataLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys (PyYAML keeps the last one silently)."""


def _construct_unique_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", key_node.start_mark
            )
        seen.add(key)
    return loader.construct_mapping(node)


_PlainDataLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_unique_mapping
)


def parse_yaml(text: str, path: Path | str) -> object:
    """Parse plain-data YAML; anchors, aliases, merge keys and duplicate keys are refused."""
    try:
        for event in yaml.parse(text, Loader=yaml.SafeLoader):
            anchor = getattr(event, "anchor", None)
            if isinstance(event, yaml.AliasEvent) or anchor is not None:
                line = event.start_mark.line + 1 if event.start_mark else 0
                where = _located(text, line)
                raise ProfileError(
                    path, [f"{where}line {line}: anchors and aliases are not allowed (plain data)"]
                )
        return yaml.load(text, Loader=_PlainDataLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark else 0
        column = f", column {mark.column + 1}" if mark else ""
        problem = exc.problem or exc.context or "invalid YAML"
        kind = (
            "invalid YAML"
            if isinstance(exc, yaml.constructor.ConstructorError)
            else ("YAML syntax error")
        )
        where = _located(text, line)
        raise ProfileError(path, [f"{where}{kind} at line {line}{column}: {problem}"]) from None
    except yaml.YAMLError as exc:
        raise ProfileError(path, [f"YAML syntax error: {exc}"]) from None


def _located(text: str, line: int) -> str:
    """'profile 'x': ' for the profile whose block holds `line` (1-based), else ''."""
    current: str | None = None
    in_profiles = False
    for number, raw in enumerate(text.splitlines()[:line], start=1):
        if re.match(r"^\S", raw):
            in_profiles = raw.startswith("profiles:")
            current = None
        elif in_profiles and (match := re.match(r"^  ([^\s#:][^:]*):", raw)):
            current = match.group(1).strip()
        if number == line:
            break
    return f"profile {current!r}: " if current else ""


def format_validation_error(exc: ValidationError) -> list[str]:
    """One 'profile 'x': field: message' line per pydantic error."""
    return [line for error in exc.errors() for line in _format_error(error).splitlines()]


def _format_error(error: ErrorDetails) -> str:
    message = error["msg"].removeprefix("Value error, ")
    loc = tuple(error["loc"])
    if len(loc) >= 2 and loc[0] == "profiles":
        profile, rest = loc[1], loc[2:]
        if rest == ("[key]",):
            return (
                f"profile {profile!r}: id: must match {PROFILE_ID_PATTERN} "
                "(lowercase letters, digits, '.', '_' and '-', at most 64)"
            )
        field = _dotted(rest)
        return (
            f"profile {profile!r}: {field}: {message}"
            if field
            else f"profile {profile!r}: {message}"
        )
    field = _dotted(loc)
    return f"{field}: {message}" if field else message


def _dotted(loc: Sequence[int | str]) -> str:
    text = ""
    for part in loc:
        if isinstance(part, int):
            text += f"[{part}]"
        elif part != "[key]":
            text += f".{part}" if text else part
    return text


def profiles_from_data(data: object, path: Path | str) -> ProfileSet:
    """Validate parsed YAML into a ProfileSet (ProfileError on any problem)."""
    if data is None:
        raise ProfileError(path, ["the file is empty; it needs 'default' and 'profiles'"])
    if not isinstance(data, dict):
        raise ProfileError(path, ["the top level must be a mapping with 'default' and 'profiles'"])
    try:
        parsed = ProfilesFile.model_validate(data)
    except ValidationError as exc:
        raise ProfileError(path, format_validation_error(exc)) from None
    return ProfileSet(
        profiles=MappingProxyType(dict(parsed.profiles)),
        default_id=parsed.default,
        source=str(path),
    )


def load_profiles(path: Path | str) -> ProfileSet:
    """Read and validate a profiles file."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ProfileError(path, [f"cannot read the profiles file: {exc}"]) from None
    return profiles_from_data(parse_yaml(text, path), path)


class ProfileRegistry:
    """Holds the current ProfileSet; a reload that fails keeps the old one."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self._current = load_profiles(self.path)

    @property
    def current(self) -> ProfileSet:
        """The profiles in use."""
        return self._current

    def reload(self) -> ProfileSet:
        """Load the file again; on ProfileError the current set stays and the error is raised."""
        fresh = load_profiles(self.path)
        self._current = fresh
        return fresh


def export_json_schema() -> dict[str, Any]:
    """The JSON schema of the profiles file (what model_profiles.schema.json holds)."""
    schema = ProfilesFile.model_json_schema()
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "vLLM Chat Gateway model profiles",
        **{key: value for key, value in schema.items() if key != "title"},
    }


def schema_text() -> str:
    """The exported schema as the committed file's text."""
    return json.dumps(export_json_schema(), indent=2, sort_keys=True) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    """``schema``: print the JSON schema; ``check FILE``: validate a profiles file."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args == ["schema"]:
        sys.stdout.write(schema_text())
        return 0
    if len(args) == 2 and args[0] == "check":
        try:
            profiles = load_profiles(args[1])
        except ProfileError as exc:
            sys.stderr.write(f"{exc}\n")
            return 1
        sys.stdout.write(f"{len(profiles.profiles)} profiles; default {profiles.default_id}\n")
        return 0
    sys.stderr.write("usage: python -m orchestrator.profiles schema | check FILE\n")
    return 2


if __name__ == "__main__":
    sys.exit(main())
