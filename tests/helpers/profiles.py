"""Model profiles the tests write: simulator commands, a model too big for the recorded GPUs,
the switching set."""

from __future__ import annotations

import sys
from typing import Any

# The simulator's flag for its test-only routes (/simulator/stats, /simulator/requests,
# /simulator/reset) and fault headers: the simulators the tests start pass it, to look at what
# the engine itself saw; the embedded `simulator` profile (what `make run` serves) never does.
TEST_ROUTES = "--test-routes"


def simulator_command(model: str, *extra: str) -> list[str]:
    """A process engine running the simulator as `model` on the port the runtime picks, with
    its test-only routes."""
    return [
        sys.executable,
        *("-m", "simulator", "--host", "127.0.0.1", "--port", "{port}", TEST_ROUTES),
        *("--model", model, *extra),
    ]


def llama_70b(served_name: str) -> dict[str, Any]:
    """A real vLLM profile far too big for the recorded 2 x 24 GiB GPUs (131 GiB of bf16
    weights): the planner calls it "does not fit", so it is never started."""
    return {
        "display_name": "Llama 3 70B (too big)",
        "engine": "vllm",
        "runtime": "docker",
        "image": "vllm/vllm-openai:v0.32.0",
        "model": "meta-llama/Meta-Llama-3-70B-Instruct",
        "served_model_name": served_name,
        "architecture": {
            "params_b": 70.554,
            "layers": 80,
            "attention_heads": 64,
            "kv_heads": 8,
            "head_dim": 128,
            "hidden_size": 8192,
            "max_context": 8192,
        },
        "vllm": {"dtype": "bfloat16"},
    }


def switching_profiles(delay_s: float = 0.0) -> dict[str, object]:
    """Three process-runtime profiles: two healthy simulators and one that fails to load."""

    delay = ["--startup-delay", str(delay_s)] if delay_s else []
    return {
        "default": "sim-a",
        "profiles": {
            "sim-a": {
                "display_name": "Simulator A",
                "engine": "command",
                "runtime": "process",
                "served_model_name": "sim-a",
                "aliases": ["model-a"],
                "command": simulator_command(
                    "sim-a", "--served-model-name", "sim-a", "model-a", *delay
                ),
                "startup_timeout_s": 30,
            },
            "sim-b": {
                "display_name": "Simulator B",
                "engine": "command",
                "runtime": "process",
                "served_model_name": "sim-b",
                "command": simulator_command("sim-b", *delay),
                "startup_timeout_s": 30,
            },
            "sim-broken": {
                "display_name": "Simulator that fails while loading",
                "engine": "command",
                "runtime": "process",
                "served_model_name": "sim-broken",
                "command": simulator_command("sim-broken", "--fail-at-start"),
                "startup_timeout_s": 30,
            },
            "simulator": {
                "display_name": "Engine simulator",
                "engine": "simulator",
                "runtime": "process",
                "served_model_name": "simulator",
            },
        },
    }


#: Qwen2-7B's shapes (config.json): 15.2 GB of bf16 weights, one recorded RTX 3090 each.
QWEN2_7B_ARCHITECTURE: dict[str, Any] = {
    "params_b": 7.616,
    "layers": 28,
    "attention_heads": 28,
    "kv_heads": 4,
    "head_dim": 128,
    "hidden_size": 3584,
    "max_context": 32768,
}


def standing_in_for_7b(profile: dict[str, Any], *, sleep_level: int = 0) -> dict[str, Any]:
    """A simulator or command profile placed on the GPUs as a 7B bf16 model at 8K context
    (the fleet claims GPU memory for it; the process itself allocates none)."""
    return {
        **profile,
        "architecture": dict(QWEN2_7B_ARCHITECTURE),  # a copy: YAML would write an alias
        "vllm": {**profile.get("vllm", {}), "dtype": "bfloat16", "max_model_len": 8192},
        **({"sleep_level": sleep_level} if sleep_level else {}),
    }
