"""What the health checks read of the app's resources."""

from __future__ import annotations

from typing import Annotated, Protocol, cast

from fastapi import Depends, Request
from redis.asyncio import Redis
from sqlalchemy.ext.asyncio import AsyncEngine

from gateway.settings import Settings
from orchestrator.manager import VLLMModelManager


class HealthResources(Protocol):
    """The dependencies the readiness checks probe."""

    @property
    def settings(self) -> Settings:
        """The settings the app was created with."""
        ...

    @property
    def db_engine(self) -> AsyncEngine:
        """The database engine."""
        ...

    @property
    def redis(self) -> Redis | None:
        """The Redis client, None without REDIS_URL."""
        ...

    @property
    def manager(self) -> VLLMModelManager:
        """The engine manager."""
        ...

    @property
    def engine_required(self) -> bool:
        """False with ENGINE=none: no engine is expected."""
        ...

    @property
    def started_at(self) -> float:
        """When the app started."""
        ...


async def get_health(request: Request) -> HealthResources:
    """The resources the health checks read."""
    return cast(HealthResources, request.app.state.resources)


HealthDep = Annotated[HealthResources, Depends(get_health)]
