"""Profile + fit verdict -> EngineSpec, in small pure steps.

Only validated profiles and the planner's verdict go in: nothing from a request body reaches
an engine's argv, environment or mounts. Docker engines listen on 0.0.0.0:8000 inside the
container (the runtime publishes that port on 127.0.0.1:port); process engines listen on
127.0.0.1:port themselves. Each spec of an engine the gateway starts carries a new random API
key (`new_engine_api_key`), so another local user cannot call the engine's port directly.

A vllm profile with `sleep_level` 1 or 2 starts with `--enable-sleep-mode` and
`VLLM_SERVER_DEV_MODE=1` (set here for that engine alone: no runtime passes the gateway's own
VLLM_* variables on). Dev mode also serves `/collective_rpc`, `/reset_prefix_cache` and more,
which vLLM's key does not guard (it guards /v1/* only): clients never reach them because the
engine listens on loopback (a container's port is published on 127.0.0.1) and the gateway
forwards only the OpenAI routes; what can open the port itself (a local process, a container on
the engine's Docker network) can call them.
"""

from __future__ import annotations

import math
import secrets
import sys
from dataclasses import replace
from pathlib import Path

from orchestrator.placement import Placement
from orchestrator.planner import Fit, FitVerdict, bytes_per_param, weights_bytes
from orchestrator.profiles import (
    HF_CACHE_CONTAINER_PATH,
    Engine,
    Profile,
    Quantization,
    RuntimeKind,
    sleep_mode_problems,
)
from orchestrator.runtimes.base import ENGINE_API_KEY_ENV, LABEL_SERVED_NAME, EngineSpec

CONTAINER_PORT = 8000
CONTAINER_HOST = "0.0.0.0"
LOOPBACK_HOST = "127.0.0.1"
# The vLLM console script does not work with the CPU build; the module does everywhere.
VLLM_SERVER_MODULE = "vllm.entrypoints.openai.api_server"
# llama-cpp-python's OpenAI-compatible server (run by its own venv's interpreter).
LLAMA_CPP_SERVER_MODULE = "llama_cpp.server"
# Where each llama.cpp server reads its key from: llama-server LLAMA_API_KEY, llama-cpp-python
# API_KEY (its settings come from the environment); VLLM_API_KEY first, as the runtimes read
# it back on adoption.
LLAMA_CPP_KEY_ENV = (ENGINE_API_KEY_ENV, "LLAMA_API_KEY", "API_KEY")
# Named by module only: the simulator is its own program, never imported by the orchestrator.
SIMULATOR_MODULE = "simulator"
# The interpreter a simulator container runs (the image's own Python).
CONTAINER_PYTHON = "python3"
# GiB of KV cache the vLLM CPU build reserves, unless the profile's env says otherwise.
DEFAULT_CPU_KVCACHE_GIB = "1"
# A self-hosted gateway does not report usage to anyone.
VLLM_PRIVACY_ENV = {"VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1"}
# vLLM serves its sleep endpoints (/sleep, /wake_up, /is_sleeping) only in its development mode.
SLEEP_MODE_FLAG = "--enable-sleep-mode"
SLEEP_MODE_ENV = {"VLLM_SERVER_DEV_MODE": "1"}
# vLLM's executor for an engine whose pipeline stages run on several nodes (a Ray cluster).
PIPELINE_EXECUTOR_BACKEND = "ray"
PORT_PLACEHOLDER = "{port}"
# Bytes of randomness in an engine's API key (43 URL-safe characters).
ENGINE_API_KEY_BYTES = 32


class SpecError(ValueError):
    """The profile cannot be run as planned; the message says why."""


def expand_home(path: str) -> str:
    """A leading ~ expanded to the home directory; anything else unchanged."""
    return str(Path(path).expanduser()) if path.startswith("~") else path


def listen_address(profile: Profile, port: int) -> tuple[str, int]:
    """Host and port the engine binds: 0.0.0.0:8000 in a container, else 127.0.0.1:port."""
    if profile.runtime is RuntimeKind.DOCKER:
        return CONTAINER_HOST, CONTAINER_PORT
    return LOOPBACK_HOST, port


def vllm_args(profile: Profile, verdict: FitVerdict, port: int) -> tuple[str, ...]:
    """vLLM's command-line arguments (without the interpreter or module)."""
    if profile.model is None:
        raise SpecError(f"profile {profile.id!r}: engine vllm needs a model")
    host, listen_port = listen_address(profile, port)
    args = [
        "--model",
        expand_home(profile.model),
        "--served-model-name",
        *profile.served_names,
        "--host",
        host,
        "--port",
        str(listen_port),
        "--tensor-parallel-size",
        str(verdict.tensor_parallel_size),
    ]
    if verdict.pipeline_parallel_size > 1:
        # One pipeline stage per node: only Ray's executor reaches GPUs on other nodes.
        args += [
            "--pipeline-parallel-size",
            str(verdict.pipeline_parallel_size),
            "--distributed-executor-backend",
            PIPELINE_EXECUTOR_BACKEND,
        ]
    if verdict.max_model_len is not None:
        args += ["--max-model-len", str(verdict.max_model_len)]
    if profile.vllm.device == "gpu":
        args += ["--gpu-memory-utilization", f"{profile.vllm.gpu_memory_utilization:g}"]
    args += ["--dtype", profile.vllm.dtype]
    if profile.quantization is not Quantization.NONE:
        args += ["--quantization", profile.quantization.value]
    if profile.vllm.kv_cache_dtype != "auto":
        args += ["--kv-cache-dtype", profile.vllm.kv_cache_dtype]
    if profile.trust_remote_code:
        args.append("--trust-remote-code")
    if profile.sleep_level:
        args.append(SLEEP_MODE_FLAG)
    return (*args, *profile.vllm.extra_args)


def simulator_args(profile: Profile, port: int) -> tuple[str, ...]:
    """The engine simulator's arguments: it serves the served name and the aliases."""
    host, listen_port = listen_address(profile, port)
    args = [
        "--host",
        host,
        "--port",
        str(listen_port),
        "--model",
        profile.served_model_name,
        "--served-model-name",
        *profile.served_names,
    ]
    if profile.max_model_len is not None:
        args += ["--max-model-len", str(profile.max_model_len)]
    return (*args, *profile.vllm.extra_args)


def command_args(profile: Profile, port: int) -> tuple[str, ...]:
    """A command engine's argv with '{port}' replaced by the port it must listen on."""
    _, listen_port = listen_address(profile, port)
    return tuple(arg.replace(PORT_PLACEHOLDER, str(listen_port)) for arg in profile.command)


def gpu_layers(profile: Profile, verdict: FitVerdict) -> int:
    """llama.cpp's --n-gpu-layers: the planner's partial offload, else the profile's (-1: all);
    0 without a GPU."""
    if not profile.uses_gpu:
        return 0
    if verdict.gpu_layers is not None:
        return verdict.gpu_layers
    return profile.llama_cpp.n_gpu_layers


def tensor_split(verdict: FitVerdict) -> str | None:
    """llama.cpp's --tensor-split over the engine's GPUs (even shares), None on one GPU."""
    count = len(verdict.gpu_ids)
    return ",".join("1" for _ in range(count)) if count > 1 else None


def llama_cpp_args(profile: Profile, verdict: FitVerdict, port: int) -> tuple[str, ...]:
    """llama-cpp-python's server (runtime process): what PyPI builds here. Its flags use
    underscores; the key comes from the environment (API_KEY), never the argv."""
    if profile.model is None:
        raise SpecError(f"profile {profile.id!r}: engine llama_cpp needs a model")
    if not profile.is_local_model:
        raise SpecError(
            f"profile {profile.id!r}: runtime process runs a local .gguf file (download it "
            "first); runtime docker fetches a repo's file itself"
        )
    host, listen_port = listen_address(profile, port)
    llama = profile.llama_cpp
    layers = gpu_layers(profile, verdict)
    args = [
        "--model", expand_home(profile.model),
        "--model_alias", profile.served_model_name,
        "--host", host,
        "--port", str(listen_port),
        "--n_gpu_layers", str(layers),
    ]  # fmt: skip
    if verdict.max_model_len is not None:
        args += ["--n_ctx", str(verdict.max_model_len)]
    split = tensor_split(verdict)
    if split is not None:
        args += ["--tensor_split", *split.split(",")]
    return (*args, *llama.extra_args)


def llama_server_args(profile: Profile, verdict: FitVerdict, port: int) -> tuple[str, ...]:
    """llama.cpp's own llama-server (runtime docker, the official image): a local file mounted
    by the profile, or a repo's file fetched into the HF cache (--hf-repo/--hf-file); the key
    comes from LLAMA_API_KEY."""
    if profile.model is None:
        raise SpecError(f"profile {profile.id!r}: engine llama_cpp needs a model")
    host, listen_port = listen_address(profile, port)
    llama = profile.llama_cpp
    if profile.is_local_model:
        source = ["--model", profile.model]
    else:
        source = ["--hf-repo", profile.model, "--hf-file", llama.gguf_file or ""]
    layers = gpu_layers(profile, verdict)
    args = [
        *source,
        "--alias", profile.served_model_name,
        "--host", host,
        "--port", str(listen_port),
        "--n-gpu-layers", str(layers),
        "--parallel", str(llama.parallel),
        "--jinja",  # the chat template from the GGUF, tools included
    ]  # fmt: skip
    if verdict.max_model_len is not None:
        args += ["--ctx-size", str(verdict.max_model_len)]
    split = tensor_split(verdict)
    if split is not None:
        args += ["--tensor-split", split]
    return (*args, *llama.extra_args)


def engine_command(
    profile: Profile,
    verdict: FitVerdict,
    *,
    port: int,
    vllm_python: str,
    gateway_python: str,
    llama_cpp_python: str = "python3",
) -> tuple[str, ...]:
    """Process: the full argv. Docker: what follows the image's entrypoint (vLLM's image
    runs the API server, llama.cpp's llama-server; a simulator image is given its interpreter
    and module)."""
    docker = profile.runtime is RuntimeKind.DOCKER
    if profile.engine is Engine.LLAMA_CPP:
        if docker:
            return llama_server_args(profile, verdict, port)
        return (
            llama_cpp_python,
            "-m",
            LLAMA_CPP_SERVER_MODULE,
            *llama_cpp_args(profile, verdict, port),
        )
    if profile.engine is Engine.VLLM:
        args = vllm_args(profile, verdict, port)
        return args if docker else (vllm_python, "-m", VLLM_SERVER_MODULE, *args)
    if profile.engine is Engine.SIMULATOR:
        python = CONTAINER_PYTHON if docker else gateway_python
        return (python, "-m", SIMULATOR_MODULE, *simulator_args(profile, port))
    if profile.engine is Engine.COMMAND:
        return command_args(profile, port)
    return ()


def engine_env(
    profile: Profile,
    verdict: FitVerdict,
    *,
    hf_cache: str | None,
    hf_token: str | None,
) -> dict[str, str]:
    """Environment: defaults, then the profile's env, then what the gateway decides."""
    env: dict[str, str] = {}
    if profile.engine is Engine.VLLM:
        env.update(VLLM_PRIVACY_ENV)
        if profile.vllm.device == "cpu":
            env["VLLM_CPU_KVCACHE_SPACE"] = DEFAULT_CPU_KVCACHE_GIB
    env.update(profile.env)
    env.update(hf_env(profile, hf_cache=hf_cache, hf_token=hf_token))
    if profile.engine is Engine.VLLM and profile.sleep_level:
        env.update(SLEEP_MODE_ENV)
    if profile.engine is Engine.LLAMA_CPP and profile.runtime is RuntimeKind.DOCKER:
        # llama-server fetches --hf-repo files into LLAMA_CACHE: kept in the mounted HF cache.
        env["LLAMA_CACHE"] = f"{HF_CACHE_CONTAINER_PATH}/llama.cpp"
    if profile.runtime is RuntimeKind.PROCESS and verdict.gpu_ids:
        # NVML numbers GPUs by PCI bus; CUDA's default order may differ.
        env["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"
        env["CUDA_VISIBLE_DEVICES"] = ",".join(str(i) for i in verdict.gpu_ids)
    return env


def hf_env(profile: Profile, *, hf_cache: str | None, hf_token: str | None) -> dict[str, str]:
    """HF_HOME for the cache, HF_HUB_OFFLINE for a local model, HF_TOKEN only when given."""
    if profile.engine not in (Engine.VLLM, Engine.COMMAND, Engine.LLAMA_CPP):
        return {}
    env: dict[str, str] = {}
    if hf_cache is not None:
        if profile.runtime is RuntimeKind.DOCKER:
            env["HF_HOME"] = HF_CACHE_CONTAINER_PATH
        elif hf_cache.startswith(("/", "~")):
            env["HF_HOME"] = expand_home(hf_cache)
    if profile.is_local_model:
        env["HF_HUB_OFFLINE"] = "1"
    if hf_token:
        env["HF_TOKEN"] = hf_token
    return env


def docker_volumes(profile: Profile, hf_cache: str | None) -> dict[str, str]:
    """Docker mounts: the HF cache (path or named volume) and the profile's volumes.

    Which of them are read-only is `docker_read_only_volumes`.
    """
    if profile.runtime is not RuntimeKind.DOCKER:
        return {}
    volumes: dict[str, str] = {}
    if hf_cache is not None and profile.engine in (Engine.VLLM, Engine.COMMAND, Engine.LLAMA_CPP):
        volumes[expand_home(hf_cache)] = HF_CACHE_CONTAINER_PATH
    volumes.update(profile.volumes)
    return volumes


def docker_read_only_volumes(profile: Profile) -> frozenset[str]:
    """The sources of `docker_volumes` mounted read-only: the profile's read_only_volumes.

    The HF cache stays writable (engines download into it); everything else is read-write
    unless the profile lists it.
    """
    if profile.runtime is not RuntimeKind.DOCKER:
        return frozenset()
    return frozenset(profile.read_only_volumes)


def engine_log_path(profile: Profile, log_dir: Path | None, instance: str) -> Path | None:
    """Where a process engine's output goes: <log_dir>/<instance>-<profile>.log."""
    if log_dir is None or profile.runtime is not RuntimeKind.PROCESS:
        return None
    return log_dir / f"{instance}-{profile.id}.log"


def new_engine_api_key() -> str:
    """A fresh random key for one start of an engine (the only impure step here)."""
    return secrets.token_urlsafe(ENGINE_API_KEY_BYTES)


def placed(
    profile: Profile, verdict: FitVerdict, placement: Placement
) -> tuple[Profile, FitVerdict]:
    """The profile and verdict of an engine the fleet placed beside others: its GPUs,
    tensor-parallel size and context come from the placement, and its gpu_memory_utilization
    from its claim (vLLM takes the fraction of the whole GPU, so an engine sharing a GPU gets
    its claim / total, not the profile's 0.90). A simulator standing in for a GPU model is told
    its claim and its weights per GPU, so that its /metrics report the memory the ledger
    counts (and what a sleep frees)."""
    fit = Fit.FITS_REDUCED_CONTEXT if placement.reduced_context else Fit.FITS
    verdict = replace(
        verdict,
        fit=fit,
        reasons=placement.reasons,
        tensor_parallel_size=placement.tensor_parallel_size,
        gpu_ids=placement.gpu_ids,
        max_model_len=placement.max_model_len,
        per_gpu_required_bytes=placement.bytes_per_gpu,
        gpu_layers=placement.gpu_layers,
    )
    vllm = profile.vllm.model_copy(
        update={
            "gpu_memory_utilization": placement.utilization,
            "max_model_len": placement.max_model_len,
        }
    )
    if profile.engine is Engine.LLAMA_CPP:
        llama = profile.llama_cpp.model_copy(update={"n_ctx": placement.max_model_len})
        return profile.model_copy(update={"llama_cpp": llama}), verdict
    if profile.engine is Engine.SIMULATOR:
        arch = profile.architecture
        weights = weights_bytes(arch, bytes_per_param(profile)) if arch else 0
        per_gpu = math.ceil(weights / max(placement.tensor_parallel_size, 1))
        extra = (
            *vllm.extra_args,
            "--gpu-memory-bytes",
            str(placement.bytes_per_gpu),
            "--weights-bytes",
            str(min(per_gpu, placement.bytes_per_gpu)),
        )
        vllm = vllm.model_copy(update={"extra_args": extra})
    return profile.model_copy(update={"vllm": vllm}), verdict


def check_runnable(profile: Profile, verdict: FitVerdict, port: int) -> None:
    """Raise SpecError unless the verdict is this profile's and says it fits."""
    if verdict.profile_id != profile.id:
        raise SpecError(f"the plan is for {verdict.profile_id!r}, not profile {profile.id!r}")
    if not verdict.fits:
        raise SpecError(f"profile {profile.id!r} does not fit: " + "; ".join(verdict.reasons))
    if profile.runtime is not RuntimeKind.EXTERNAL and not 0 < port < 65536:
        raise SpecError(f"profile {profile.id!r}: port {port} is not a TCP port")
    # The profile's validation refuses these already; a profile changed with model_copy skips it.
    if profile.engine is Engine.VLLM and profile.sleep_level:
        problems = list(sleep_mode_problems(profile))
        if problems:
            raise SpecError(f"profile {profile.id!r}: " + "; ".join(problems))


def build_engine_spec(
    profile: Profile,
    verdict: FitVerdict,
    *,
    port: int,
    vllm_python: str,
    hf_cache: str | None,
    hf_token: str | None,
    log_dir: Path | None,
    instance: str,
    gateway_python: str = sys.executable,
    llama_cpp_python: str = "python3",
) -> EngineSpec:
    """The EngineSpec that runs `profile` as `verdict` planned it, with a new API key.

    Every engine the gateway starts gets a key: vLLM and the simulator read it from
    VLLM_API_KEY and enforce it on /v1/*; a command engine that does not read it ignores it and
    the Authorization header alike. External engines get none here (the gateway's
    VLLM_API_KEY setting is theirs).
    """
    check_runnable(profile, verdict, port)
    labels = {LABEL_SERVED_NAME: profile.served_model_name}
    llama = profile.engine is Engine.LLAMA_CPP
    docker = profile.runtime is RuntimeKind.DOCKER
    if profile.runtime is RuntimeKind.EXTERNAL:
        return EngineSpec(
            profile_id=profile.id,
            served_model_name=profile.served_model_name,
            runtime=profile.runtime.value,
            aliases=profile.aliases,
            base_url=profile.base_url,
            startup_timeout_s=profile.startup_timeout,
            labels=labels,
        )
    return EngineSpec(
        profile_id=profile.id,
        served_model_name=profile.served_model_name,
        runtime=profile.runtime.value,
        aliases=profile.aliases,
        command=engine_command(
            profile,
            verdict,
            port=port,
            vllm_python=vllm_python,
            gateway_python=gateway_python,
            llama_cpp_python=llama_cpp_python,
        ),
        image=profile.image,
        env=engine_env(profile, verdict, hf_cache=hf_cache, hf_token=hf_token),
        port=port,
        container_port=CONTAINER_PORT,
        gpu_ids=verdict.gpu_ids,
        volumes=docker_volumes(profile, hf_cache),
        read_only_volumes=docker_read_only_volumes(profile),
        startup_timeout_s=profile.startup_timeout,
        api_key=new_engine_api_key(),
        api_key_env=LLAMA_CPP_KEY_ENV if llama else (ENGINE_API_KEY_ENV,),
        # llama-cpp-python's server has no /health: /v1/models (with the key) says it serves.
        health_path="/v1/models" if llama and not docker else "/health",
        labels=labels,
        log_path=engine_log_path(profile, log_dir, instance),
    )
