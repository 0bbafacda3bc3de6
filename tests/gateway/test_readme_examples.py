"""The README's "Use it like OpenAI" examples (seed 000's curl, Python and JavaScript clients) run
as written against a real gateway, with a real API key and the simulator engine behind it.

The blocks are read from README.md itself, so an example that drifts from what the gateway
does fails here. Only the address and the key are filled in.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import sys
from pathlib import Path

import pytest

from gateway.migrate import upgrade
from tests.helpers.quota import create_key, quota_gateway, quota_settings

README = Path(__file__).resolve().parents[2] / "README.md"
SECTION = "## Use it like OpenAI"
_FENCE = re.compile(r"```(bash|python|javascript)\n(.*?)```", re.DOTALL)


def _examples() -> dict[str, list[str]]:
    text = README.read_text()
    start = text.index(SECTION)
    end = text.index("\n## ", start + len(SECTION))
    found: dict[str, list[str]] = {}
    for language, code in _FENCE.findall(text[start:end]):
        found.setdefault(language, []).append(code)
    return found


async def _run(*command: str, env: dict[str, str], cwd: Path) -> str:
    process = await asyncio.create_subprocess_exec(
        *command,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env={**os.environ, **env},
        cwd=cwd,
    )
    output, _ = await asyncio.wait_for(process.communicate(), timeout=60)
    text = output.decode(errors="replace")
    assert process.returncode == 0, f"{command[0]} exited {process.returncode}:\n{text}"
    return text


def test_the_section_has_the_three_clients() -> None:
    examples = _examples()
    assert len(examples["bash"]) == 1
    assert len(examples["python"]) == 1
    assert len(examples["javascript"]) == 1


async def test_readme_examples_run_against_the_gateway(tmp_path: Path) -> None:
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed: the JavaScript example cannot run here")
    examples = _examples()
    url = f"sqlite+aiosqlite:///{tmp_path / 'gateway.db'}"
    await asyncio.to_thread(upgrade, url)
    async with quota_gateway(quota_settings(url)) as gw:
        key = (await create_key(gw.http, "readme-client", tier="premium"))["key"]

        def fill(code: str) -> str:
            return code.replace("http://127.0.0.1:8080", gw.url).replace("sk-vcg-...", key)

        env = {"KEY": key}
        shell = await _run("bash", "-euo", "pipefail", "-c", fill(examples["bash"][0]), env=env,
                           cwd=tmp_path)  # fmt: skip
        # The non-streamed answer, then the stream: chunks and the end marker.
        assert '"object":"chat.completion"' in shell.replace(" ", "")
        assert "chat.completion.chunk" in shell
        assert "data: [DONE]" in shell

        script = tmp_path / "example.py"
        script.write_text(fill(examples["python"][0]))
        python = await _run(sys.executable, str(script), env=env, cwd=tmp_path)
        # One printed reply, then the streamed one on the same stdout.
        assert len(python.strip()) > 0

        module = tmp_path / "example.mjs"
        module.write_text("const KEY = process.env.KEY;\n" + fill(examples["javascript"][0]))
        javascript = await _run(node, str(module), env=env, cwd=tmp_path)
        assert len(javascript.strip()) > 0

        # All three were served by the gateway with this key (usage is recorded per key).
        stats = await gw.sim_stats()
        assert stats["requests_total"] >= 5
