"""The official Node SDKs (npm's ``openai`` and ``@anthropic-ai/sdk``) as the tests' clients.

``scripts/bootstrap-node-clients.sh`` installs them, pinned, under
``<cache>/node-clients/<hash of the versions>/node_modules`` and prints that path;
``scripts/test.sh`` exports it as ``VCG_NODE_CLIENTS``. Outside the test command
``find_node_clients`` runs the script itself (instant when cached, seconds the first time).

* ``VCG_NODE_CLIENTS``  the SDKs' ``node_modules`` folder (default: what the script prints)
* ``VCG_CACHE``         the cache root, read by the script
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.helpers.paths import REPO
from tests.helpers.services import ServiceUnavailable

BOOTSTRAP_SCRIPT = REPO / "scripts" / "bootstrap-node-clients.sh"
BOOTSTRAP_HINT = "run scripts/test.sh (or scripts/bootstrap-node-clients.sh) to install them"
PACKAGES = ("openai", "@anthropic-ai/sdk")


@dataclass(frozen=True)
class NodeClients:
    """A node binary and the folder holding the pinned SDKs."""

    node: Path
    node_modules: Path

    async def run(
        self, script: str, env: Mapping[str, str] | None = None, timeout_s: float = 60.0
    ) -> dict[str, Any]:
        """Run ``script`` (an ES module) with these SDKs; see ``run_node``."""
        return await run_node(self, script, env, timeout_s)


def find_node_clients() -> NodeClients:
    """The SDKs at ``VCG_NODE_CLIENTS``, or installed (or found cached) by the bootstrap script.

    Raises ServiceUnavailable when node is missing or the SDKs cannot be found or installed."""
    node = shutil.which("node")
    if node is None:
        raise ServiceUnavailable("node not found; scripts/bootstrap-system.sh installs nodejs")
    configured = os.environ.get("VCG_NODE_CLIENTS")
    if configured:
        node_modules = Path(configured)
    else:
        proc = subprocess.run(
            ["bash", str(BOOTSTRAP_SCRIPT)],
            capture_output=True,
            text=True,
            check=False,
            timeout=600,
        )
        if proc.returncode != 0:
            raise ServiceUnavailable(
                f"{BOOTSTRAP_SCRIPT.name} failed ({proc.returncode}):\n{proc.stderr[-4000:]}"
            )
        node_modules = Path(proc.stdout.strip().splitlines()[-1])
    missing = [name for name in PACKAGES if not (node_modules / name / "package.json").is_file()]
    if missing:
        raise ServiceUnavailable(f"{', '.join(missing)} not in {node_modules}; {BOOTSTRAP_HINT}")
    return NodeClients(node=Path(node), node_modules=node_modules)


async def run_node(
    clients: NodeClients,
    script: str,
    env: Mapping[str, str] | None = None,
    timeout_s: float = 60.0,
) -> dict[str, Any]:
    """Run ``script`` as an ES module (``import OpenAI from "openai"`` works) with ``env`` added
    to the environment, and return the JSON object it prints on its last line of stdout.

    A nonzero exit, a timeout or a last line that is not a JSON object fails the test with the
    script's output. Asynchronous: the gateway under test is served on the same event loop."""
    with tempfile.TemporaryDirectory(prefix="vcg-node-") as tmp:
        folder = Path(tmp)
        # ES modules ignore NODE_PATH: a bare `import "openai"` is looked up in node_modules/
        # beside the importing file and in its parents only. A link to the cached SDKs beside
        # the script resolves it as in any npm project, and loads the SDKs' ES-module builds,
        # the ones users import (createRequire would load their CommonJS builds instead).
        (folder / "node_modules").symlink_to(clients.node_modules, target_is_directory=True)
        path = folder / "script.mjs"
        path.write_text(script)
        process = await asyncio.create_subprocess_exec(
            str(clients.node),
            str(path),
            cwd=folder,
            env={**os.environ, **(env or {})},
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        try:
            raw_out, raw_err = await asyncio.wait_for(process.communicate(), timeout_s)
        except TimeoutError:
            process.kill()
            raw_out, raw_err = await process.communicate()
            raise AssertionError(
                f"node script still running after {timeout_s} s\n"
                f"stdout:\n{raw_out.decode(errors='replace')}\n"
                f"stderr:\n{raw_err.decode(errors='replace')}"
            ) from None
    stdout = raw_out.decode(errors="replace")
    stderr = raw_err.decode(errors="replace")
    if process.returncode != 0:
        raise AssertionError(
            f"node script exited with {process.returncode}\nstderr:\n{stderr}\nstdout:\n{stdout}"
        )
    lines = stdout.strip().splitlines()
    try:
        result = json.loads(lines[-1]) if lines else None
    except json.JSONDecodeError:
        result = None
    if not isinstance(result, dict):
        raise AssertionError(
            f"node script's last line is not a JSON object\nstdout:\n{stdout}\nstderr:\n{stderr}"
        )
    return result
