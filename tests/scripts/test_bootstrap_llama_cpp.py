"""scripts/bootstrap-llama-cpp.sh: an exact pin, two machine-readable lines, a cached wheel."""

from __future__ import annotations

import os
import re
import subprocess
import time
from pathlib import Path

from tests.helpers.llama_cpp_engine import BOOTSTRAP_SCRIPT


def _pinned(variable: str) -> str:
    match = re.search(rf"\${{{variable}:-([^}}]*)}}", BOOTSTRAP_SCRIPT.read_text())
    assert match, f"no {variable} default in {BOOTSTRAP_SCRIPT}"
    return match.group(1)


def _run(
    env: dict[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(BOOTSTRAP_SCRIPT)],
        capture_output=True,
        text=True,
        check=False,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def test_the_version_is_pinned_exactly() -> None:
    assert re.fullmatch(r"\d+\.\d+\.\d+", _pinned("VCG_LLAMA_CPP_VERSION"))


def test_a_cached_run_prints_the_two_paths_and_builds_nothing(
    llama_cpp_install: tuple[Path, Path],
) -> None:
    python, gguf = llama_cpp_install
    started = time.monotonic()
    proc = _run()
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == f"LLAMA_CPP_PYTHON={python}\nTINY_GGUF={gguf}\n"
    assert "building" not in proc.stderr
    assert "converting" not in proc.stderr
    assert time.monotonic() - started < 30
    version = subprocess.run(
        [str(python), "-c", "import importlib.metadata as m; print(m.version('llama_cpp_python'))"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert version == os.environ.get("VCG_LLAMA_CPP_VERSION", _pinned("VCG_LLAMA_CPP_VERSION"))


def test_a_new_venv_installs_the_cached_wheel_without_compiling(
    llama_cpp_install: tuple[Path, Path], tmp_path: Path
) -> None:
    _, gguf = llama_cpp_install
    venv = tmp_path / "venv"
    proc = _run({"VCG_LLAMA_CPP_VENV": str(venv), "VCG_TINY_GGUF": str(gguf)}, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "wheel: ok" in proc.stderr
    assert "building" not in proc.stderr
    assert proc.stdout.splitlines()[0] == f"LLAMA_CPP_PYTHON={venv}/bin/python"
    assert (venv / ".vcg-complete").is_file()


def test_a_folder_that_is_not_a_venv_is_left_alone(
    llama_cpp_install: tuple[Path, Path], tmp_path: Path
) -> None:
    keep = tmp_path / "precious.txt"
    keep.write_text("mine")
    proc = _run({"VCG_LLAMA_CPP_VENV": str(tmp_path)})
    assert proc.returncode == 1
    assert "is not a virtualenv" in proc.stderr
    assert proc.stdout == ""
    assert keep.read_text() == "mine"
