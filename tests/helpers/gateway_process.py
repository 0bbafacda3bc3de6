"""A real gateway process (`python -m gateway serve`) for tests that need a fresh interpreter:
Prometheus's registry, multiprocess mode, process signals."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx

from gateway.migrate import upgrade
from tests.helpers.app import TEST_SECRET
from tests.helpers.paths import REPO
from tests.helpers.polling import eventually
from tests.helpers.ports import free_port


@asynccontextmanager
async def gateway_process(
    multiproc_dir: Path | None, workdir: Path, **overrides: str
) -> AsyncIterator[tuple[httpx.AsyncClient, asyncio.subprocess.Process]]:
    """`python -m gateway serve` in its own process (ENGINE=none, production, a migrated SQLite
    file); yields a client on it and the process. `multiproc_dir` turns on Prometheus's
    multiprocess mode; `overrides` are more environment variables."""
    port = free_port()
    database = workdir / f"gw-{port}.db"
    url = f"sqlite+aiosqlite:///{database}"
    await asyncio.to_thread(upgrade, url)
    env = {
        **os.environ,
        "HOST": "127.0.0.1",
        "PORT": str(port),
        "DATABASE_URL": url,
        "AUTO_MIGRATE": "false",
        "JWT_SECRET": TEST_SECRET,
        "ENGINE": "none",
        "ENVIRONMENT": "production",
        "REQUIRE_AUTH": "false",
        "MODEL_PROFILES": str(REPO / "model_profiles.yml"),
        "STATE_DIR": str(workdir / f"state-{port}"),
        "LOG_LEVEL": "WARNING",
        **overrides,
    }
    if multiproc_dir is not None:
        env["PROMETHEUS_MULTIPROC_DIR"] = str(multiproc_dir)
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway", "serve",
        cwd=workdir, env=env,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:

            async def up() -> bool:
                assert process.returncode is None, "the gateway process exited"
                try:
                    return (await client.get("/health")).status_code == 200
                except httpx.TransportError:
                    return False

            await eventually(up, 60, 0.1)
            yield client, process
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
            await asyncio.wait_for(process.wait(), 30)
