"""An app with its lifespan running and an HTTP client on it; production-mode test settings."""

from __future__ import annotations

import tempfile
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

import httpx
from asgi_lifespan import LifespanManager
from fastapi import FastAPI

from gateway.app import create_app
from gateway.settings import Settings

TEST_SECRET = "k3Jv9-qLr2Zt8WmX4pYs7Nc1Bd6Hf0Ag5Ue2Io9Kl"


AppFactory = Callable[..., AbstractAsyncContextManager[tuple[FastAPI, httpx.AsyncClient]]]


def make_settings(**overrides: Any) -> Settings:
    """Production-mode settings with a strong secret and no engine unless overridden."""
    values: dict[str, Any] = {
        "STATE_DIR": tempfile.mkdtemp(prefix="vcg-state-"),
        "ENVIRONMENT": "production",
        "JWT_SECRET": TEST_SECRET,
        "ENGINE": "none",
        "LOG_FORMAT": "json",
        # Tests of the proxy and models run without credentials; auth tests turn this on.
        "REQUIRE_AUTH": False,
    }
    values.update(overrides)
    return Settings(_env_file=None, **values)


def engine_headers(app: FastAPI) -> dict[str, str]:
    """The Authorization header of the engine the app runs (its API key, new at every start):
    what a test needs to call that engine directly, around the gateway."""
    spec = app.state.resources.manager.spec
    key = spec.api_key if spec is not None else None
    return {"Authorization": f"Bearer {key}"} if key else {}


@asynccontextmanager
async def running_app(
    settings: Settings, customize: Callable[[FastAPI], None] | None = None
) -> AsyncIterator[tuple[FastAPI, httpx.AsyncClient]]:
    """Create the app, run its lifespan, and yield it with a client bound to it."""
    app = create_app(settings)
    if customize is not None:
        customize(app)
    async with LifespanManager(app, startup_timeout=60, shutdown_timeout=30) as manager:
        transport = httpx.ASGITransport(app=manager.app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gateway.test") as client:
            yield app, client


@asynccontextmanager
async def served_app(settings: Settings) -> AsyncIterator[tuple[FastAPI, str]]:
    """Serve the app with uvicorn on a free loopback port (real sockets: streaming works)."""
    import asyncio

    import uvicorn

    from tests.helpers.ports import free_port

    app = create_app(settings)
    port = free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, lifespan="on")
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    try:
        for _ in range(400):
            if server.started:
                break
            if task.done():
                task.result()
            await asyncio.sleep(0.025)
        yield app, f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, 30)
