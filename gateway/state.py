"""The shared resources one app owns for its lifetime."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

import aiohttp
import httpx
from redis.asyncio import Redis
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from gateway.chat.deps import ChatResources
from gateway.deps import CoreResources
from gateway.engine import EngineResources, ModelControl
from gateway.health.deps import HealthResources
from gateway.limits.deps import LimitResources
from gateway.limits.factory import Limiters
from gateway.principal import Authenticator
from gateway.proxy.scheduler import Scheduler
from gateway.settings import Settings
from gateway.usage.recorder import UsageRecorder
from orchestrator.manager import VLLMModelManager


@dataclass
class AppState:
    """Created by the lifespan, closed by it. Each layer reads it through a protocol of its own
    (`gateway.deps.CoreResources`, `gateway.proxy.deps.ProxyResources`, ...), so only the app
    imports this class; `_conforms` makes mypy check that it satisfies every one of them."""

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
    authenticator: Authenticator
    started_at: float = field(default_factory=time.time)
    background: set[asyncio.Task[object]] = field(default_factory=set)

    @property
    def manager(self) -> VLLMModelManager:
        """The engine manager."""
        return self.models.manager


def _conforms(
    state: AppState,
) -> tuple[CoreResources, LimitResources, EngineResources, ChatResources, HealthResources]:
    """Never called: mypy checks here that the state provides what every layer reads (the
    chat API's protocol extends the proxy's)."""
    return state, state, state, state, state
