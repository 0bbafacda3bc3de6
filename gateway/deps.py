"""Annotated dependency aliases of the core: settings, a database session and the caller.
Routes of every layer declare what they need; the lifespan provides it.

The lifespan keeps its resources on `app.state.resources` (`gateway.state.AppState`, at the top
of the package graph). Each layer reads them through a protocol of its own that names only what
it needs (`CoreResources` here), so no package below the app imports the app's state.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Annotated, Protocol, cast

from fastapi import Depends, Request
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from gateway.principal import Authenticator, Principal
from gateway.settings import Settings


class CoreResources(Protocol):
    """What the core dependencies read of the app's resources."""

    @property
    def settings(self) -> Settings:
        """The settings the app was created with."""
        ...

    @property
    def session_factory(self) -> async_sessionmaker[AsyncSession]:
        """Opens database sessions."""
        ...

    @property
    def authenticator(self) -> Authenticator:
        """Resolves callers."""
        ...


def core_resources(request: Request) -> CoreResources:
    """The resources as the core sees them."""
    return cast(CoreResources, request.app.state.resources)


async def get_settings(request: Request) -> Settings:
    """The settings the app was created with."""
    return core_resources(request).settings


async def get_session(request: Request) -> AsyncIterator[AsyncSession]:
    """One database session per request."""
    async with core_resources(request).session_factory() as session:
        yield session


# The caller once resolved, kept in the request's own scope: the route guard (gateway.routing)
# resolves it before the body is read and the dependency then returns the same one, so the
# admin API's per-caller limit is counted once.
_PRINCIPAL_KEY = "gateway.deps.principal"
_ADMIN_KEY = "gateway.deps.admin"


async def _once(
    request: Request, key: str, resolve: Callable[[Request], Awaitable[Principal]]
) -> Principal:
    cached = request.scope.get(key)
    if isinstance(cached, Principal):
        return cached
    principal = await resolve(request)
    request.scope[key] = principal
    return principal


async def get_principal(request: Request) -> Principal:
    """The caller: 401 without valid credentials (anonymous only when REQUIRE_AUTH is off)."""
    return await _once(request, _PRINCIPAL_KEY, core_resources(request).authenticator.principal)


async def get_admin(request: Request) -> Principal:
    """An admin caller: 401 without credentials, 403 without the admin role, 429/503 from the
    admin API's per-caller limit."""
    return await _once(request, _ADMIN_KEY, core_resources(request).authenticator.admin)


SettingsDep = Annotated[Settings, Depends(get_settings)]
SessionDep = Annotated[AsyncSession, Depends(get_session)]
PrincipalDep = Annotated[Principal, Depends(get_principal)]
AdminDep = Annotated[Principal, Depends(get_admin)]
