"""The README's run command: embedded default (SQLite + simulator), prints the URL, serves."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import httpx

from tests.helpers.paths import REPO
from tests.helpers.ports import free_port


def test_make_run_serves_health_docs_and_a_ready_engine(tmp_path: Path) -> None:
    port = free_port()
    env = {
        **{k: v for k, v in os.environ.items() if k not in {"JWT_SECRET", "ENVIRONMENT"}},
        "PORT": str(port),
        "DATABASE_URL": f"sqlite+aiosqlite:///{tmp_path / 'run.db'}",
        "LOG_FORMAT": "console",
    }
    log_path = tmp_path / "run.log"
    with log_path.open("w") as log:
        process = subprocess.Popen(
            ["make", "--no-print-directory", "run"],
            cwd=REPO,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    base = f"http://127.0.0.1:{port}"
    try:
        ready = None
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            assert process.poll() is None, log_path.read_text()
            try:
                ready = httpx.get(f"{base}/health/ready", timeout=2)
                if ready.status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        assert ready is not None, log_path.read_text()
        assert ready.status_code == 200, log_path.read_text()
        assert ready.json()["checks"]["engine"]["status"] == "up"
        assert ready.json()["checks"]["database"]["status"] == "up"
        assert httpx.get(f"{base}/health", timeout=5).status_code == 200
        docs = httpx.get(f"{base}/docs", timeout=5)
        assert docs.status_code == 200
        assert "swagger" in docs.text.lower()
        assert "cdn." not in docs.text  # served from the gateway: works on a closed network
        openapi = httpx.get(f"{base}/openapi.json", timeout=5).json()
        assert "/health/ready" in openapi["paths"]
        output = log_path.read_text()
        assert f"http://127.0.0.1:{port}/" in output
        assert f"http://127.0.0.1:{port}/chat" in output
        chat = httpx.get(f"{base}/chat", timeout=5)
        assert chat.status_code == 200
        assert chat.headers["content-type"].startswith("text/html")
        # No GPU here: the log says why the default profile cannot run and what runs instead.
        assert "engine_plan" in output
        assert "running the engine simulator" in output
        assert "profile=simulator state=ready" in output
        assert (tmp_path / "run.db").exists()
        engines = [pid for pid in _descendants(process.pid) if b"-m\0simulator\0" in _cmd(pid)]
        assert len(engines) == 1, "expected exactly one simulator child"
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(30)
    output = log_path.read_text()
    assert "gateway_stopped" in output
    # The simulator child went down with the gateway.
    assert not any(Path(f"/proc/{pid}").exists() for pid in engines)


def _cmd(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def _descendants(root: int) -> list[int]:
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            # The command name may contain spaces; fields after ")" are positional.
            parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    found, frontier = [], [root]
    while frontier:
        current = frontier.pop()
        children = [pid for pid, ppid in parents.items() if ppid == current]
        found.extend(children)
        frontier.extend(children)
    return found
