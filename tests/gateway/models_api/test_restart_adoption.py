"""A gateway process that dies keeps its engine; the next one adopts it. A clean stop ends it.

Both gateways are real `python -m gateway serve` processes sharing one STATE_DIR, and the engine
is the simulator as a real process (detached: its own session, output to a file), so this is
what an operator sees when the gateway crashes or is stopped with SIGTERM.
"""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from gateway.settings import Settings
from tests.helpers.app import TEST_SECRET
from tests.helpers.paths import REPO
from tests.helpers.ports import free_port
from tests.helpers.processes import pid_alive
from tests.helpers.proxy import sim_profile

ADMIN_KEY = "sk-admin-test-adoption-7d2e9f4a1c6b"
AUTH = {"Authorization": f"Bearer {ADMIN_KEY}"}
PROFILE = "sim-adopt"
HELLO = [{"role": "user", "content": "hello there"}]


class GatewayProcess:
    """One `python -m gateway serve` process on a free port, logging to a file."""

    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        with log_path.open("w") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "gateway", "serve"],
                # Not the repo: a developer's .env there must not change these settings.
                cwd=log_path.parent,
                env={**env, "PORT": str(self.port)},
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def log(self) -> str:
        """Everything the gateway wrote so far."""
        return self.log_path.read_text(errors="replace")

    def engine(self) -> dict[str, Any] | None:
        """GET /api/models/status -> engine, or None while the gateway does not answer yet."""
        assert self.process.poll() is None, f"gateway exited early:\n{self.log()}"
        try:
            response = httpx.get(f"{self.url}/api/models/status", headers=AUTH, timeout=5)
        except httpx.TransportError:
            return None
        assert response.status_code == 200, response.text
        engine: dict[str, Any] = response.json()["engine"]
        return engine

    def wait_ready(self, timeout_s: float = 90.0) -> dict[str, Any]:
        """Wait until the gateway serves and its engine is ready; return the engine view."""
        deadline = time.monotonic() + timeout_s
        engine = None
        while time.monotonic() < deadline:
            engine = self.engine()
            if engine is not None and engine["state"] == "ready":
                return engine
            time.sleep(0.1)
        raise AssertionError(
            f"gateway not ready in {timeout_s:g}s (engine: {engine})\n{self.log()}"
        )

    def chat(self) -> dict[str, Any]:
        """One chat completion through the gateway's OpenAI API."""
        response = httpx.post(
            f"{self.url}/v1/chat/completions",
            json={"model": PROFILE, "messages": HELLO, "max_tokens": 5},
            timeout=30,
        )
        assert response.status_code == 200, response.text
        body: dict[str, Any] = response.json()
        return body

    def stop(self, sig: signal.Signals, timeout_s: float = 60.0) -> int:
        """Send `sig` to the gateway process alone (not its engine) and wait for its exit."""
        if self.process.poll() is None:
            self.process.send_signal(sig)
        return self.process.wait(timeout_s)


def _gateway_env(tmp_path: Path) -> dict[str, str]:
    """The environment of both gateways: one STATE_DIR, one SQLite file, one profiles file."""
    profiles = tmp_path / "model_profiles.yml"
    profiles.write_text(
        yaml.safe_dump({"default": PROFILE, "profiles": {PROFILE: sim_profile(PROFILE)}})
    )
    # The test runner's environment, without any variable the gateway reads as a setting.
    env = {k: v for k, v in os.environ.items() if k not in Settings.model_fields}
    env.update(
        {
            "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")])),
            "HOST": "127.0.0.1",
            "ENVIRONMENT": "production",
            "JWT_SECRET": TEST_SECRET,
            "ADMIN_API_KEY": ADMIN_KEY,
            "STATE_DIR": str(tmp_path / "state"),
            "DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path / 'gateway.db'}",
            "MODEL_PROFILES": str(profiles),
            "ENGINE": "auto",
            "DEFAULT_PROFILE": PROFILE,
            "INSTANCE_NAME": f"adopt-{os.getpid()}",
            # Anonymous callers on the loopback, without per-IP limits getting in the way.
            "REQUIRE_AUTH": "false",
            "RATE_LIMIT_REQUESTS": "0",
            "LOG_FORMAT": "json",
            "LOG_LEVEL": "INFO",
        }
    )
    return env


def _engine_stats(engine_url: str, api_key: str) -> dict[str, Any]:
    """The simulator's own counters: they survive only as long as that process does."""
    headers = {"Authorization": f"Bearer {api_key}"}
    response = httpx.get(f"{engine_url}/simulator/stats", headers=headers, timeout=5)
    assert response.status_code == 200, response.text
    stats: dict[str, Any] = response.json()
    return stats


@pytest.fixture
def cleanup() -> Iterator[list[GatewayProcess | int]]:
    """Gateways and engine pids to end if a test fails halfway (nothing leaks to later tests)."""
    started: list[GatewayProcess | int] = []
    yield started
    for item in started:
        if isinstance(item, GatewayProcess):
            if item.process.poll() is None:
                item.process.kill()
                item.process.wait(30)
        elif pid_alive(item):
            # The engine leads its own process group (a new session): end it with its workers.
            os.killpg(item, signal.SIGKILL)


def test_a_killed_gateway_is_replaced_by_one_that_adopts_its_engine(
    tmp_path: Path, cleanup: list[GatewayProcess | int]
) -> None:
    env = _gateway_env(tmp_path)
    state_file = tmp_path / "state" / "engines" / f"{PROFILE}.json"

    first = GatewayProcess(env, tmp_path / "first.log")
    cleanup.append(first)
    engine = first.wait_ready()
    recorded = json.loads(state_file.read_text())
    pid = int(recorded["pid"])
    cleanup.append(pid)
    assert recorded["base_url"] == engine["engine_url"]
    # The engine's API key is kept for the next gateway, in a file only the gateway's user reads.
    key = recorded["api_key"]
    assert len(key) >= 40
    assert stat.S_IMODE(state_file.stat().st_mode) == 0o600
    assert httpx.get(f"{engine['engine_url']}/v1/models", timeout=5).status_code == 401
    assert first.chat()["model"] == PROFILE
    served_before = _engine_stats(engine["engine_url"], key)["requests_total"]
    assert served_before >= 1

    # A crash: SIGKILL runs no shutdown code, so the detached engine keeps running.
    assert first.stop(signal.SIGKILL) == -signal.SIGKILL
    assert pid_alive(pid), "the engine died with the killed gateway"

    second = GatewayProcess(env, tmp_path / "second.log")
    cleanup.append(second)
    adopted = second.wait_ready()
    # The same process at the same URL: adopted, not restarted (its counters carried over).
    assert adopted["profile_id"] == PROFILE
    assert adopted["engine_url"] == engine["engine_url"]
    assert json.loads(state_file.read_text()) == recorded
    assert _engine_stats(engine["engine_url"], key)["requests_total"] == served_before
    assert "adopted the running engine of profile sim-adopt" in second.log()
    assert "engine_adopted" in second.log()

    completion = second.chat()
    assert completion["model"] == PROFILE
    assert completion["choices"][0]["message"]["content"]
    assert completion["usage"]["completion_tokens"] > 0
    assert completion["usage"]["total_tokens"] == (
        completion["usage"]["prompt_tokens"] + completion["usage"]["completion_tokens"]
    )
    # ... through the adopted engine, with the key read back from the state file.
    assert _engine_stats(engine["engine_url"], key)["requests_total"] == served_before + 1
    assert pid_alive(pid)

    # A graceful stop (what systemd and `docker stop` send) stops the engine with the gateway.
    # uvicorn re-raises the signal once it has shut down, so the exit reads "killed by SIGTERM";
    # the "gateway_stopped" line shows that the lifespan's shutdown ran to its end first.
    assert second.stop(signal.SIGTERM) in (0, -signal.SIGTERM), second.log()
    assert "gateway_stopped" in second.log()
    assert not pid_alive(pid), "the engine outlived a gracefully stopped gateway"
    assert not state_file.exists()
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{engine['engine_url']}/health", timeout=5)
