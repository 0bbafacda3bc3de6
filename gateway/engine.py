"""Which engine the gateway runs at startup, decided from settings and the GPU inventory."""

from __future__ import annotations

import socket
import sys

from gateway.settings import EngineMode, Settings
from orchestrator.gpus import GpuInventory
from orchestrator.runtimes import EngineSpec

SIMULATOR_PROFILE = "simulator"


def free_loopback_port() -> int:
    """Ask the kernel for a free port on 127.0.0.1."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def simulator_spec(settings: Settings, port: int | None = None) -> EngineSpec:
    """The engine simulator as a child process on a loopback port."""
    port = port or settings.SIMULATOR_PORT or free_loopback_port()
    command = (
        sys.executable,
        "-m",
        "orchestrator.simulator",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--model",
        settings.DEFAULT_MODEL,
        "--tokens-per-second",
        str(settings.SIMULATOR_TOKENS_PER_SECOND),
    )
    return EngineSpec(
        profile_id=SIMULATOR_PROFILE,
        served_model_name=settings.DEFAULT_MODEL,
        runtime="process",
        command=command,
        port=port,
        startup_timeout_s=60.0,
    )


def external_spec(settings: Settings) -> EngineSpec:
    """An engine someone else runs at VLLM_BASE_URL."""
    assert settings.VLLM_BASE_URL is not None
    return EngineSpec(
        profile_id="external",
        served_model_name=settings.DEFAULT_MODEL,
        runtime="external",
        base_url=settings.VLLM_BASE_URL,
        startup_timeout_s=settings.ENGINE_STARTUP_TIMEOUT_S,
        api_key=settings.VLLM_API_KEY.get_secret_value() if settings.VLLM_API_KEY else None,
    )


def startup_engine(settings: Settings, gpus: GpuInventory) -> tuple[EngineSpec | None, str]:
    """Pick the engine to start and say why; None means start nothing."""
    mode = settings.ENGINE
    if mode is EngineMode.NONE:
        return None, "ENGINE=none: no engine is started"
    if mode is EngineMode.EXTERNAL or (mode is EngineMode.AUTO and settings.VLLM_BASE_URL):
        if not settings.VLLM_BASE_URL:
            return None, "ENGINE=external but VLLM_BASE_URL is not set"
        return external_spec(settings), "routing to the external engine at VLLM_BASE_URL"
    if mode is EngineMode.SIMULATOR:
        return simulator_spec(settings), "ENGINE=simulator"
    if gpus.count == 0:
        reason = gpus.reason or "no GPU found"
        return simulator_spec(settings), f"{reason}; running the engine simulator"
    return None, f"{gpus.count} GPU(s) found; start a model profile through the model API"
