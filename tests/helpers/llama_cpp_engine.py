"""Real llama.cpp (llama-cpp-python's OpenAI server, a CPU build) serving a tiny GGUF on 127.0.0.1.

``scripts/bootstrap-llama-cpp.sh`` builds the venv and converts the tiny random-weight Llama of
``scripts/bootstrap-vllm.sh`` to ``tiny.gguf``, both under ``${XDG_CACHE_HOME:-~/.cache}/
vllm-chat-gateway``, and prints their paths; ``scripts/test.sh`` exports them:

* ``VCG_LLAMA_CPP_PYTHON``  the llama.cpp venv's interpreter
                            (default ``<cache>/llama-cpp-venv/bin/python``)
* ``VCG_TINY_GGUF``         the tiny GGUF (default ``<cache>/tiny-gguf/tiny.gguf``)
* ``VCG_CACHE``             the cache root itself

The model's text is noise: assert on shapes, counts and usage, never on content.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO

import httpx

from tests.helpers.paths import REPO
from tests.helpers.ports import free_port
from tests.helpers.services import ServiceUnavailable


def _cache_root() -> Path:
    if os.environ.get("VCG_CACHE"):
        return Path(os.environ["VCG_CACHE"])
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "vllm-chat-gateway"


LLAMA_CPP_PYTHON = Path(
    os.environ.get("VCG_LLAMA_CPP_PYTHON") or _cache_root() / "llama-cpp-venv/bin/python"
)
TINY_GGUF = Path(os.environ.get("VCG_TINY_GGUF") or _cache_root() / "tiny-gguf/tiny.gguf")
TINY_GGUF_NAME = "tiny-gguf"
BOOTSTRAP_SCRIPT = REPO / "scripts" / "bootstrap-llama-cpp.sh"
BOOTSTRAP_HINT = "run scripts/test.sh (or scripts/bootstrap-llama-cpp.sh) to build it"


def check_llama_cpp_python(python: Path = LLAMA_CPP_PYTHON) -> None:
    """Raise ServiceUnavailable unless ``python`` exists and has llama_cpp (cheap check)."""
    if not python.exists():
        raise ServiceUnavailable(
            f"llama.cpp venv not found ({python} is missing); {BOOTSTRAP_HINT}"
        )
    probe = subprocess.run(
        [str(python), "-c", "import importlib.util as u; assert u.find_spec('llama_cpp.server')"],
        capture_output=True,
        check=False,
        timeout=60,
    )
    if probe.returncode != 0:
        raise ServiceUnavailable(f"{python} has no llama_cpp.server; {BOOTSTRAP_HINT}")


def find_llama_cpp_install(
    python: Path = LLAMA_CPP_PYTHON, gguf: Path = TINY_GGUF
) -> tuple[Path, Path]:
    """The llama.cpp venv's python and the tiny GGUF.

    A missing venv is ServiceUnavailable (building it compiles llama.cpp for minutes: the test
    command does that, not a test). A missing GGUF beside a present venv is made by running the
    bootstrap script, which then only converts the tiny Llama (seconds)."""
    check_llama_cpp_python(python)
    if gguf.is_file():
        return python, gguf
    proc = subprocess.run(
        ["bash", str(BOOTSTRAP_SCRIPT)],
        capture_output=True,
        text=True,
        check=False,
        timeout=900,
        env={**os.environ, "VCG_TINY_GGUF": str(gguf)},
    )
    if proc.returncode != 0 or not gguf.is_file():
        raise ServiceUnavailable(
            f"{BOOTSTRAP_SCRIPT.name} failed ({proc.returncode}) to make {gguf}:\n"
            f"{proc.stderr[-4000:]}"
        )
    return python, gguf


def gguf_py_dir(python: Path = LLAMA_CPP_PYTHON) -> Path:
    """llama.cpp's own ``gguf-py`` of the installed release (the bootstrap script extracts it
    from the sdist beside the converter), to check this project's reader against."""
    version = subprocess.run(
        [str(python), "-c", "import importlib.metadata as m; print(m.version('llama_cpp_python'))"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout.strip()
    path = _cache_root() / "llama-cpp-converter" / version / "gguf-py"
    if not (path / "gguf" / "__init__.py").is_file():
        raise ServiceUnavailable(f"llama.cpp's gguf-py not found at {path}; {BOOTSTRAP_HINT}")
    return path


class LlamaCppEngine:
    """``python -m llama_cpp.server`` on 127.0.0.1:port serving one GGUF under an alias."""

    def __init__(
        self,
        gguf: Path = TINY_GGUF,
        *,
        model: str = TINY_GGUF_NAME,
        port: int | None = None,
        python: Path = LLAMA_CPP_PYTHON,
        n_ctx: int = 256,
        extra_args: Sequence[str] = (),
        log_path: Path | None = None,
    ) -> None:
        self.gguf = gguf
        self.model = model
        self.port = port if port is not None else free_port()
        self.python = python
        self.n_ctx = n_ctx
        self.extra_args = list(extra_args)
        self.log_path = log_path or Path(tempfile.mkstemp(prefix="vcg-llama-", suffix=".log")[1])
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self.started_in: float | None = None  # seconds from spawn to 200 on /v1/models

    @property
    def root_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def base_url(self) -> str:
        """OpenAI-style base URL (``.../v1``)."""
        return f"{self.root_url}/v1"

    def command(self) -> list[str]:
        return [
            str(self.python), "-m", "llama_cpp.server",
            "--model", str(self.gguf), "--model_alias", self.model,
            "--host", "127.0.0.1", "--port", str(self.port),
            "--n_ctx", str(self.n_ctx),
            *self.extra_args,
        ]  # fmt: skip

    def environment(self) -> dict[str, str]:
        env = {
            k: v
            for k, v in os.environ.items()
            if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME", "PYTEST_CURRENT_TEST")
        }
        env["PYTHONUNBUFFERED"] = "1"
        return env

    def log_tail(self, lines: int = 60) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return f"\n--- llama.cpp log {self.log_path} ---\n" + "\n".join(text.splitlines()[-lines:])

    def is_running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, timeout: float = 120) -> LlamaCppEngine:
        """Spawn the server and wait until ``GET /v1/models`` answers 200 (raises with the log
        tail if the process dies or the timeout passes)."""
        if self.is_running():
            return self
        check_llama_cpp_python(self.python)
        t0 = time.monotonic()
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            self.command(),
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=self.environment(),
            cwd=tempfile.gettempdir(),
            start_new_session=True,  # own process group: stop() ends everything it started
        )
        deadline = t0 + timeout
        while True:
            if self.proc.poll() is not None:
                rc = self.proc.returncode
                self.stop()
                raise RuntimeError(f"llama.cpp exited with {rc} while starting{self.log_tail()}")
            try:
                if httpx.get(f"{self.base_url}/models", timeout=2.0).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(f"llama.cpp not ready after {timeout} s{self.log_tail()}")
            time.sleep(0.2)
        self.started_in = time.monotonic() - t0
        return self

    def stop(self, timeout: float = 20) -> None:
        """SIGTERM the process group, SIGKILL it if it lingers."""
        proc = self.proc
        if proc is not None:
            if proc.poll() is None:
                _signal_group(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    _signal_group(proc.pid, signal.SIGKILL)
                    proc.wait(10)
            self.proc = None
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> LlamaCppEngine:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)
