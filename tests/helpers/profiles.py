"""Profiles for switching tests."""

from __future__ import annotations

import sys


def switching_profiles(delay_s: float = 0.0) -> dict[str, object]:
    """Three process-runtime profiles: two healthy simulators and one that fails to load."""

    def simulator_command(model: str, *extra: str) -> list[str]:
        return [
            sys.executable,
            "-m",
            "simulator",
            "--host",
            "127.0.0.1",
            "--port",
            "{port}",
            "--model",
            model,
            *extra,
        ]

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
