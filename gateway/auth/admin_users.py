"""/admin/api/users: user management, admin only (changes that end sessions go through the auth
service)."""

from __future__ import annotations

import uuid
from typing import Annotated

from fastapi import APIRouter, Depends, Query

from gateway.auth import service
from gateway.deps import SessionDep, get_admin
from gateway.errors import GatewayError
from gateway.routing import GuardedRoute
from gateway.users import service as users_service
from gateway.users.schemas import UserCreate, UserList, UserUpdate, UserView

router = APIRouter(
    route_class=GuardedRoute,
    prefix="/admin/api/users",
    tags=["users"],
    dependencies=[Depends(get_admin)],
    responses={401: {"description": "No credentials"}, 403: {"description": "Not an admin"}},
)


@router.post("", response_model=UserView, status_code=201)
async def create_user(body: UserCreate, session: SessionDep) -> UserView:
    """Create a user (no password: a service account that authenticates with API keys only)."""
    user = await users_service.create_user(
        session=session,
        username=body.username,
        password=body.password,
        role=body.role,
        tier=body.tier,
        email=body.email,
    )
    return UserView.model_validate(user)


@router.get("", response_model=UserList)
async def list_users(
    session: SessionDep,
    limit: Annotated[int, Query(ge=1, le=500)] = 100,
    offset: Annotated[int, Query(ge=0, le=2**31 - 1)] = 0,
) -> UserList:
    """Users, oldest first."""
    users = await users_service.list_users(session=session, limit=limit, offset=offset)
    total = await users_service.count_users(session=session)
    return UserList(data=[UserView.model_validate(user) for user in users], total=total)


@router.get("/{user_id}", response_model=UserView)
async def get_user(user_id: uuid.UUID, session: SessionDep) -> UserView:
    """One user."""
    user = await users_service.get_user(session=session, user_id=user_id)
    if user is None:
        raise GatewayError(404, "No such user.", code="user_not_found")
    return UserView.model_validate(user)


@router.patch("/{user_id}", response_model=UserView)
async def update_user(user_id: uuid.UUID, body: UserUpdate, session: SessionDep) -> UserView:
    """Activate or deactivate a user (ends their sessions), or change their role or tier."""
    user = await service.update_user(
        session=session, user_id=user_id, is_active=body.is_active, role=body.role, tier=body.tier
    )
    return UserView.model_validate(user)
