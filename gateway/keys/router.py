"""API key routes: the seed's admin API under /admin/api/keys, self-service under /api/keys."""

from __future__ import annotations

import uuid
from typing import Any

from fastapi import APIRouter, Response, status

from gateway.deps import AdminDep, PrincipalDep, SessionDep, SettingsDep
from gateway.keys import service
from gateway.keys.schemas import (
    AdminKeyCreate,
    AdminKeyUpdate,
    KeyCreated,
    KeyInfo,
    KeyList,
    MyKeyCreate,
)
from gateway.routing import GuardedRoute

router = APIRouter(tags=["keys"], route_class=GuardedRoute)

_NOT_FOUND: dict[int | str, dict[str, Any]] = {404: {"description": "No such key (or not yours)"}}


# -- admin -----------------------------------------------------------------------------------


@router.post("/admin/api/keys", status_code=status.HTTP_201_CREATED, response_model=KeyCreated)
async def admin_create_key(
    body: AdminKeyCreate, _: AdminDep, session: SessionDep, settings: SettingsDep
) -> KeyCreated:
    """Create a key for any user (by id or username); an unknown name becomes a service
    account. The key is in this reply only: it cannot be shown again."""
    owner = await service.resolve_owner(session, user_ref=body.user_id, tier=body.tier)
    key, raw = await service.create_key(
        session,
        owner=owner,
        tier=body.tier,
        description=body.description,
        expires_at=body.expires_at,
        allowed_models=body.allowed_models,
        prefix=settings.API_KEY_PREFIX,
        caller_id=None,
        caller_is_admin=True,
        caller_tier=owner.tier,
        allowed_fields=body.allowed_fields,
    )
    return KeyCreated(**KeyInfo.of(key, owner).model_dump(), key=raw)


@router.get("/admin/api/keys", response_model=KeyList)
async def admin_list_keys(_: AdminDep, session: SessionDep) -> KeyList:
    """Every key, newest first: prefix and metadata, never the key or its digest."""
    return KeyList(data=[KeyInfo.of(k, u) for k, u in await service.list_keys(session)])


@router.put("/admin/api/keys/{key_id}", response_model=KeyInfo, responses=_NOT_FOUND)
async def admin_update_key(
    key_id: uuid.UUID, body: AdminKeyUpdate, _: AdminDep, session: SessionDep
) -> KeyInfo:
    """Change a key's description, tier, expiry, models or the request fields it may send
    beyond the default policy (`allowed_fields`)."""
    key, owner = await service.get_key(session, key_id=key_id)
    changes = body.model_dump(include=body.model_fields_set)
    await service.update_key(session, key=key, changes=changes, caller_is_admin=True)
    return KeyInfo.of(key, owner)


@router.delete(
    "/admin/api/keys/{key_id}", status_code=status.HTTP_204_NO_CONTENT, responses=_NOT_FOUND
)
async def admin_revoke_key(key_id: uuid.UUID, _: AdminDep, session: SessionDep) -> Response:
    """Revoke a key; it stops working at once (within seconds on other gateway processes)."""
    key, _owner = await service.get_key(session, key_id=key_id)
    await service.revoke_key(session, key=key)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


# -- self-service ----------------------------------------------------------------------------


@router.post("/api/keys", status_code=status.HTTP_201_CREATED, response_model=KeyCreated)
async def create_my_key(
    body: MyKeyCreate, principal: PrincipalDep, session: SessionDep, settings: SettingsDep
) -> KeyCreated:
    """Create a key for yourself: tier up to your own, models within your own. Shown once.

    Needs a login (access token): an API key cannot mint further keys, so a leaked key cannot
    outlive its own revocation.
    """
    owner = await service.get_owner(
        session, user_id=principal.user_id, minting_with_api_key=principal.via == "api_key"
    )
    key, raw = await service.create_key(
        session,
        owner=owner,
        tier=body.tier,
        description=body.description,
        expires_at=body.expires_at,
        allowed_models=body.allowed_models,
        prefix=settings.API_KEY_PREFIX,
        caller_id=principal.user_id,
        caller_is_admin=False,
        caller_tier=principal.tier,
        caller_allowed_models=principal.allowed_models,
    )
    return KeyCreated(**KeyInfo.of(key, owner).model_dump(), key=raw)


@router.get("/api/keys", response_model=KeyList)
async def list_my_keys(principal: PrincipalDep, session: SessionDep) -> KeyList:
    """Your keys, newest first."""
    rows = await service.list_keys(session, user_id=principal.user_id)
    return KeyList(data=[KeyInfo.of(k, u) for k, u in rows])


@router.delete("/api/keys/{key_id}", status_code=status.HTTP_204_NO_CONTENT, responses=_NOT_FOUND)
async def revoke_my_key(
    key_id: uuid.UUID, principal: PrincipalDep, session: SessionDep
) -> Response:
    """Revoke one of your keys."""
    key, _owner = await service.get_key(session, key_id=key_id, owner_id=principal.user_id)
    await service.revoke_key(session, key=key)
    return Response(status_code=status.HTTP_204_NO_CONTENT)
