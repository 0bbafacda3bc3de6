"""A throwaway Redis server for tests: ``redis-server`` as a child process on 127.0.0.1.

No persistence (``--save '' --appendonly no``), working dir in a temp dir. ``stop()`` then
``start()`` brings it back, empty, on the same port (for fault-injection tests).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import IO

from tests.helpers.ports import free_port, port_open, wait_port_closed
from tests.helpers.services import ServiceUnavailable


def find_redis_server() -> str:
    """Path of redis-server (``$VCG_REDIS_SERVER`` or PATH); raises ServiceUnavailable."""
    env = os.environ.get("VCG_REDIS_SERVER")
    found = env or shutil.which("redis-server") or shutil.which("redis-server", path="/usr/sbin")
    if not found or not os.access(found, os.X_OK):
        raise ServiceUnavailable(
            "redis-server not found; install it with scripts/bootstrap-system.sh "
            "(apt-get install redis-server) or set VCG_REDIS_SERVER"
        )
    return found


def _ping(port: int, host: str = "127.0.0.1") -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


class RedisServer:
    """``redis-server`` on 127.0.0.1:port, database 0 at ``.url``."""

    host = "127.0.0.1"

    def __init__(self, port: int | None = None, *, binary: str | None = None) -> None:
        self.binary = binary or find_redis_server()
        self._fixed_port = port is not None
        self.port = port if port is not None else free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="vcg-redis-"))
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self.started_in: float | None = None  # seconds the last start() took

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    @property
    def log_path(self) -> Path:
        return self.dir / "redis.log"

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n--- redis log ---\n" + "\n".join(text.splitlines()[-lines:])

    def is_running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, timeout: float = 15) -> RedisServer:
        """Start redis-server (if not running) and wait until it answers PING."""
        if self.is_running():
            return self
        t0 = time.monotonic()
        for attempt in range(3):
            try:
                self._spawn(timeout)
                break
            except RuntimeError:
                if self._fixed_port or attempt == 2 or not port_open(self.port):
                    raise
                self.port = free_port()  # the free port was taken meanwhile: try another
        self.started_in = time.monotonic() - t0
        return self

    def _spawn(self, timeout: float) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [
                self.binary, "--port", str(self.port), "--bind", self.host,
                "--save", "", "--appendonly", "no", "--daemonize", "no",
                "--dir", str(self.dir), "--protected-mode", "yes",
            ],
            stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True,
        )  # fmt: skip
        deadline = time.monotonic() + timeout
        while not _ping(self.port):
            if self.proc.poll() is not None:
                rc = self.proc.returncode
                self._close()
                raise RuntimeError(f"redis-server exited with {rc}{self.log_tail()}")
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(f"redis-server did not answer PING{self.log_tail()}")
            time.sleep(0.02)

    def _close(self) -> None:
        self.proc = None
        if self._log is not None:
            self._log.close()
            self._log = None

    def stop(self, *, kill: bool = False) -> None:
        """Stop the server (SIGTERM, or SIGKILL with kill=True); ``start()`` restarts it on the
        same port, empty."""
        proc = self.proc
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
            wait_port_closed(self.port)
        self._close()

    def close(self) -> None:
        """Stop the server and delete its temp dir."""
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
