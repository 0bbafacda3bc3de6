"""Serving the simulator with uvicorn (uvloop + httptools when available)."""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import time

import uvicorn

from simulator.app import create_simulator_app, install_log_filter
from simulator.config import SimulatorConfig

logger = logging.getLogger("simulator")


class SimulatedStartupFailure(RuntimeError):
    """The simulated engine "failed to load" (``fail_at_start``)."""


def _has_module(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def create_server(config: SimulatorConfig) -> uvicorn.Server:
    """A uvicorn server for the simulator; ``await server.serve()`` or ``server.run()``."""
    uv_config = uvicorn.Config(
        create_simulator_app(config),
        host=config.host,
        port=config.port,
        loop="uvloop" if _has_module("uvloop") else "asyncio",
        http="httptools" if _has_module("httptools") else "h11",
        ws="none",
        lifespan="on",
        access_log=False,
        log_level=config.log_level,
        timeout_graceful_shutdown=2,
    )
    install_log_filter()
    return uvicorn.Server(uv_config)


def _loading_message(config: SimulatorConfig) -> str:
    return (
        f"vLLM engine SIMULATOR (no GPU, no weights) loading model {config.model!r} "
        f"(simulated startup delay {config.startup_delay:g}s)"
    )


def _failure_message(config: SimulatorConfig) -> str:
    return (
        f"vLLM engine SIMULATOR: simulated engine failure while loading {config.model!r} "
        "(--fail-at-start): CUDA out of memory (simulated)"
    )


async def serve(config: SimulatorConfig) -> None:
    """Serve in the running event loop, after the simulated startup delay.

    Raises :class:`SimulatedStartupFailure` when ``config.fail_at_start`` is set.
    Nothing listens on the port until the delay is over, as with vLLM.
    """
    logger.info(_loading_message(config))
    if config.startup_delay:
        await asyncio.sleep(config.startup_delay)
    if config.fail_at_start:
        logger.error(_failure_message(config))
        raise SimulatedStartupFailure(_failure_message(config))
    await create_server(config).serve()


def run(config: SimulatorConfig) -> int:
    """Run the simulator in this process until it is stopped; returns the exit status."""
    logger.info(_loading_message(config))
    if config.startup_delay:
        time.sleep(config.startup_delay)
    if config.fail_at_start:
        logger.error(_failure_message(config))
        return 1
    server = create_server(config)
    logger.info(
        "vLLM engine SIMULATOR starting its HTTP server on http://%s:%d (tokens/s per stream: %s)",
        config.host,
        config.port,
        config.tokens_per_second or "unlimited",
    )
    server.run()
    return 0 if server.started else 1
