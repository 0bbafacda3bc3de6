"""The shared resources one app owns for its lifetime."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import aiohttp
import httpx
from redis.asyncio import Redis
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from gateway.engine import ModelControl
from gateway.limits.factory import Limiters
from gateway.proxy.scheduler import Scheduler
from gateway.settings import Settings
from gateway.usage.recorder import UsageRecorder
from orchestrator.manager import VLLMModelManager


@dataclass
class AppState:
    """Created by the lifespan, closed by it; routes reach it through `deps`."""

    settings: Settings
    db_engine: AsyncEngine
    session_factory: async_sessionmaker[AsyncSession]
    redis: Redis | None
    http: httpx.AsyncClient  # the manager's and health checks' calls
    relay_session: aiohttp.ClientSession  # the proxy's upstream calls (gateway.proxy.upstream)
    models: ModelControl
    scheduler: Scheduler
    engine_required: bool
    usage: UsageRecorder
    limiters: Limiters
    started_at: float = field(default_factory=time.time)
    background: set[asyncio.Task[object]] = field(default_factory=set)

    @property
    def manager(self) -> VLLMModelManager:
        """The engine manager."""
        return self.models.manager
