"""Annotated dependency aliases: routes declare what they need, the lifespan provides it."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated

import httpx
from fastapi import Depends, Request
from redis.asyncio import Redis
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from gateway.auth.principal import (
    ANONYMOUS,
    Principal,
    admin_principal,
    authenticated_principal,
    cached_principal,
)
from gateway.errors import GatewayError
from gateway.metrics import count_auth_failure
from gateway.settings import Settings
from gateway.state import AppState
from orchestrator.manager import VLLMModelManager


async def get_state(request: Request) -> AppState:
    """The resources the lifespan created."""
    state: AppState = request.app.state.resources
    return state


StateDep = Annotated[AppState, Depends(get_state)]


async def get_settings(state: StateDep) -> Settings:
    """The settings the app was created with."""
    return state.settings


async def get_session(state: StateDep) -> AsyncIterator[AsyncSession]:
    """One database session per request."""
    async with state.session_factory() as session:
        yield session


async def get_db_engine(state: StateDep) -> AsyncEngine:
    """The database engine."""
    return state.db_engine


async def get_redis(state: StateDep) -> Redis | None:
    """The Redis client, or None when REDIS_URL is not configured."""
    return state.redis


async def get_http(state: StateDep) -> httpx.AsyncClient:
    """The one HTTP client for upstream engines."""
    return state.http


async def get_manager(state: StateDep) -> VLLMModelManager:
    """The model manager."""
    return state.manager


SettingsDep = Annotated[Settings, Depends(get_settings)]
SessionDep = Annotated[AsyncSession, Depends(get_session)]
DbEngineDep = Annotated[AsyncEngine, Depends(get_db_engine)]
RedisDep = Annotated["Redis | None", Depends(get_redis)]
HttpDep = Annotated[httpx.AsyncClient, Depends(get_http)]
ManagerDep = Annotated[VLLMModelManager, Depends(get_manager)]


async def get_principal(request: Request, state: StateDep) -> Principal:
    """The caller: 401 without valid credentials (anonymous only when REQUIRE_AUTH is off)."""
    settings = state.settings
    if not settings.REQUIRE_AUTH and "authorization" not in request.headers:
        # The hot path of a single-user setup: no credentials, nothing to look up.
        return ANONYMOUS
    # A key in the key cache needs no session; one is opened only when credentials must be
    # checked against the database.
    cached = cached_principal(request, settings)
    if cached is not None:
        return cached
    async with state.session_factory() as session:
        try:
            return await authenticated_principal(request, settings, session)
        except GatewayError as exc:
            _count_refusal(exc)
            raise


async def get_admin(request: Request, settings: SettingsDep, session: SessionDep) -> Principal:
    """An admin caller: 401 without credentials, 403 without the admin role."""
    try:
        return await admin_principal(request, settings, session)
    except GatewayError as exc:
        _count_refusal(exc)
        raise


def _count_refusal(exc: GatewayError) -> None:
    # 401/403 are refused credentials; a 503 (database down) is not the caller's failure.
    if exc.status_code in (401, 403):
        count_auth_failure(exc.code)


PrincipalDep = Annotated[Principal, Depends(get_principal)]
AdminDep = Annotated[Principal, Depends(get_admin)]
