"""What the proxy reads of the app's resources, and its route dependencies."""

from __future__ import annotations

from typing import Annotated, Protocol, cast

import aiohttp
from fastapi import Depends, Request

from gateway.engine import ModelControl
from gateway.limits.factory import Limiters
from gateway.proxy.scheduler import Scheduler
from gateway.settings import Settings
from gateway.usage.recorder import UsageRecorder
from orchestrator.manager import VLLMModelManager


class ProxyResources(Protocol):
    """The resources the proxy's services take (the app's state provides them)."""

    @property
    def settings(self) -> Settings:
        """The settings the app was created with."""
        ...

    @property
    def models(self) -> ModelControl:
        """Profiles, GPUs, the planner and the manager."""
        ...

    @property
    def manager(self) -> VLLMModelManager:
        """The engine manager."""
        ...

    @property
    def scheduler(self) -> Scheduler:
        """The load balancer."""
        ...

    @property
    def limiters(self) -> Limiters:
        """The inference and token limiters."""
        ...

    @property
    def usage(self) -> UsageRecorder:
        """Usage rows, written in batches."""
        ...

    @property
    def relay_session(self) -> aiohttp.ClientSession:
        """The upstream client of the relay."""
        ...

    @property
    def started_at(self) -> float:
        """When the app started (the `created` of /v1/models)."""
        ...


def proxy_resources(request: Request) -> ProxyResources:
    """The resources as the proxy sees them."""
    return cast(ProxyResources, request.app.state.resources)


async def get_proxy(request: Request) -> ProxyResources:
    """The proxy's resources."""
    return proxy_resources(request)


async def get_scheduler(request: Request) -> Scheduler:
    """The load balancer."""
    return proxy_resources(request).scheduler


ProxyDep = Annotated[ProxyResources, Depends(get_proxy)]
SchedulerDep = Annotated[Scheduler, Depends(get_scheduler)]
