"""GET / : what this service is and where to go next."""

from __future__ import annotations

from fastapi import APIRouter
from pydantic import BaseModel

from gateway import __version__
from gateway.deps import SettingsDep
from gateway.engine import ModelsDep

router = APIRouter(tags=["meta"])


class ServiceInfo(BaseModel):
    """The root document."""

    service: str
    version: str
    environment: str
    docs: str
    health: str
    chat: str
    console: str
    engine: str | None
    engine_state: str


@router.get("/", response_model=ServiceInfo)
async def root(models: ModelsDep, settings: SettingsDep) -> ServiceInfo:
    """Service name, version, and links to the docs and health endpoints."""
    status = models.status()
    return ServiceInfo(
        service=settings.APP_NAME,
        version=__version__,
        environment=settings.ENVIRONMENT.value,
        docs="/docs",
        health="/health",
        chat="/chat",
        console="/dashboard",
        engine=status.served_model_name,
        engine_state=status.state.value,
    )
