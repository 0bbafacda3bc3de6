"""The proxy against simulator engines: profiles, settings, a served gateway."""

from __future__ import annotations

import asyncio
import sys
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import yaml
from fastapi import FastAPI
from openai.types.chat import ChatCompletionMessageParam

from gateway.migrate import upgrade
from gateway.settings import Settings
from orchestrator.profiles import EngineApi
from tests.helpers.app import engine_headers, make_settings, served_app
from tests.helpers.polling import eventually
from tests.helpers.ports import free_port
from tests.helpers.profiles import TEST_ROUTES

ADMIN_KEY = "sk-admin-test-proxy-4f7a2c9e1b3d"


AUTH = {"Authorization": f"Bearer {ADMIN_KEY}"}


# Typed as the OpenAI SDK's message so that SDK calls type-check; JSON bodies take it as is.
HELLO: list[ChatCompletionMessageParam] = [{"role": "user", "content": "hello there"}]


def sim_command(model: str, *flags: str, aliases: tuple[str, ...] = ()) -> list[str]:
    """argv of a simulator engine serving `model` (and aliases) on the '{port}' placeholder,
    with its test-only routes (`Gateway.sim_stats` reads what the engine itself saw)."""
    names = ["--served-model-name", model, *aliases] if aliases else []
    return [
        sys.executable,
        "-m",
        "simulator",
        *("--host", "127.0.0.1", "--port", "{port}", "--model", model),
        *names,
        *("--log-level", "warning", TEST_ROUTES),
        *flags,
    ]


def sim_profile(
    model: str,
    *flags: str,
    aliases: tuple[str, ...] = (),
    apis: tuple[str, ...] = tuple(EngineApi),
) -> dict[str, Any]:
    """A process-runtime profile running the simulator with process-level flags; `apis`: the
    engine APIs its profile says it serves (all of vLLM's, as the simulator implements them;
    none for an engine that speaks only chat, completions and embeddings)."""
    profile: dict[str, Any] = {
        "display_name": f"Simulator {model}",
        "engine": "command",
        "runtime": "process",
        "served_model_name": model,
        "command": sim_command(model, *flags, aliases=aliases),
        "startup_timeout_s": 30,
        "apis": [str(api) for api in apis],
    }
    if aliases:
        profile["aliases"] = list(aliases)
    return profile


def write_profiles(profiles: dict[str, dict[str, Any]], default: str) -> Path:
    """A model_profiles.yml in a fresh temp dir."""
    path = Path(tempfile.mkdtemp(prefix="vcg-proxy-")) / "model_profiles.yml"
    path.write_text(yaml.safe_dump({"default": default, "profiles": profiles}))
    return path


def gateway_settings(
    profiles: dict[str, dict[str, Any]], default: str, **overrides: Any
) -> Settings:
    """Settings that run `default` at startup from these profiles, on a fresh migrated database.

    The proxy is tested without credentials (REQUIRE_AUTH off; the admin API uses ADMIN_KEY)
    and without rate limits (0 = unlimited): an anonymous caller is limited per IP, and these
    tests send hundreds of requests from 127.0.0.1.
    """
    database_url = f"sqlite+aiosqlite:///{Path(tempfile.mkdtemp(prefix='vcg-proxy-db-'))}/gw.db"
    upgrade(database_url)
    values: dict[str, Any] = {
        "DATABASE_URL": database_url,
        "REQUIRE_AUTH": False,
        "RATE_LIMIT_REQUESTS": 0,
        "RATE_LIMIT_STANDARD_PER_MINUTE": 0,
        "RATE_LIMIT_STANDARD_PER_HOUR": 0,
        "RATE_LIMIT_STANDARD_TOKENS_PER_MINUTE": 0,
        "ADMIN_API_KEY": ADMIN_KEY,
        "MODEL_PROFILES": str(write_profiles(profiles, default)),
        "ENGINE": "auto",
        "DEFAULT_PROFILE": default,
        "LOG_LEVEL": "WARNING",
    }
    values.update(overrides)
    return make_settings(**values)


@dataclass
class Gateway:
    """A gateway served on a loopback port, and an HTTP client on it."""

    app: FastAPI
    url: str
    http: httpx.AsyncClient

    @property
    def manager(self) -> Any:
        """The in-process engine manager."""
        return self.app.state.resources.manager

    def engine_headers(self) -> dict[str, str]:
        """The Authorization header the running engine requires (its per-start API key)."""
        return engine_headers(self.app)

    def sdk(self, **options: Any) -> openai.AsyncOpenAI:
        """The official async SDK on the gateway (no retries: every failure shows)."""
        return openai.AsyncOpenAI(
            base_url=f"{self.url}/v1", api_key="unused", max_retries=0, **options
        )

    def sync_sdk(self, **options: Any) -> openai.OpenAI:
        """The official sync SDK on the gateway (call it through asyncio.to_thread)."""
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key="unused", max_retries=0, **options)

    async def engine_status(self) -> dict[str, Any]:
        """GET /api/models/status -> engine."""
        response = await self.http.get("/api/models/status", headers=AUTH)
        assert response.status_code == 200, response.text
        return dict(response.json()["engine"])

    async def wait_ready(self, profile_id: str | None = None, timeout_s: float = 30.0) -> str:
        """Wait until the engine (of this profile) is ready; return its URL."""

        async def ready() -> str | None:
            if profile_id is not None:
                # Any engine of the fleet, the default or not.
                fleet_engine = self.manager.engine(profile_id)
                serves = fleet_engine is not None and fleet_engine.serves
                return fleet_engine.base_url if serves and fleet_engine else None
            engine = await self.engine_status()
            return str(engine["engine_url"]) if engine["state"] == "ready" else None

        url: str = await eventually(ready, timeout_s)
        return url

    async def lb(self) -> dict[str, Any]:
        """GET /lb/status."""
        response = await self.http.get("/lb/status")
        assert response.status_code == 200, response.text
        return dict(response.json())

    async def sim_stats(self, engine_url: str | None = None) -> dict[str, Any]:
        """The simulator engine's own counters (requests_total, aborted_total, running...)."""
        url = engine_url or await self.wait_ready()
        response = await self.http.get(f"{url}/simulator/stats", headers=self.engine_headers())
        assert response.status_code == 200, response.text
        return dict(response.json())

    async def switch(self, profile_id: str, *, exclusive: bool = False) -> dict[str, Any]:
        """Switch through the admin API and wait for the job's outcome."""
        accepted = await self.http.post(
            "/api/models/switch",
            json={"profile_id": profile_id, "exclusive": exclusive},
            headers=AUTH,
        )
        assert accepted.status_code == 202, accepted.text
        job_id = accepted.json()["job_id"]

        async def finished() -> dict[str, Any] | None:
            job = (await self.http.get(f"/api/models/switch/{job_id}", headers=AUTH)).json()
            return None if job["status"] in ("pending", "running") else dict(job)

        job: dict[str, Any] = await eventually(finished, 60)
        return job


@asynccontextmanager
async def gateway(settings: Settings, *, wait: bool = True) -> AsyncIterator[Gateway]:
    """Serve the gateway with uvicorn (real sockets: streams and disconnects are real)."""
    async with (
        served_app(settings) as (app, url),
        httpx.AsyncClient(base_url=url, timeout=30) as http,
    ):
        gw = Gateway(app=app, url=url, http=http)
        if wait:
            await gw.wait_ready()
        yield gw


@asynccontextmanager
async def simulator_process(*args: str) -> AsyncIterator[str]:
    """A simulator started by the test itself (e.g. standing in for the cloud), with its
    test-only routes (the tests read its /simulator/stats); yields its URL."""
    port = free_port()
    process = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "simulator", TEST_ROUTES),
        *("--host", "127.0.0.1", "--port", str(port), "--log-level", "warning", *args),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        async with httpx.AsyncClient() as client:

            async def up() -> bool:
                try:
                    return (await client.get(f"{url}/health")).status_code == 200
                except httpx.TransportError:
                    return False

            await eventually(up, 15)
        yield url
    finally:
        if process.returncode is None:
            process.terminate()
        await process.wait()
