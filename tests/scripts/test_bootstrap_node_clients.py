"""scripts/bootstrap-node-clients.sh: exact pins, installed once, and a quiet cached run."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

from tests.helpers.node_clients import BOOTSTRAP_SCRIPT, NodeClients

PINS = {"openai": "VCG_NODE_OPENAI_VERSION", "@anthropic-ai/sdk": "VCG_NODE_ANTHROPIC_VERSION"}


def _pinned(variable: str) -> str:
    match = re.search(rf"\${{{variable}:-([^}}]*)}}", BOOTSTRAP_SCRIPT.read_text())
    assert match, f"no {variable} default in {BOOTSTRAP_SCRIPT}"
    return match.group(1)


def test_versions_are_pinned_exactly() -> None:
    for variable in PINS.values():
        assert re.fullmatch(r"\d+\.\d+\.\d+", _pinned(variable)), variable


def test_a_cached_run_prints_the_path_alone_and_installs_the_pins(
    node_clients: NodeClients,
) -> None:
    # node_clients ran (or the test command ran) the script once: this run finds it cached.
    proc = subprocess.run(
        ["bash", str(BOOTSTRAP_SCRIPT)], capture_output=True, text=True, check=False, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    node_modules = Path(proc.stdout.removesuffix("\n"))
    assert proc.stdout == f"{node_modules}\n"
    assert node_modules.parent.parent.name == "node-clients"
    for package, variable in PINS.items():
        manifest = json.loads((node_modules / package / "package.json").read_text())
        assert manifest["version"] == _pinned(variable), package
