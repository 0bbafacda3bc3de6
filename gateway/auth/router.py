"""/api/auth/*: log in, refresh, log out, the caller's own account; /admin/api/login."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from starlette.responses import Response

from gateway.auth import service
from gateway.auth.principal import bearer_token
from gateway.auth.schemas import (
    LOGIN_OPENAPI,
    LogoutRequest,
    MeUpdate,
    MeView,
    RefreshRequest,
    TokenResponse,
    parse_login,
)
from gateway.auth.service import TokenPair
from gateway.body import read_capped_body
from gateway.deps import PrincipalDep, SessionDep, SettingsDep
from gateway.errors import GatewayError
from gateway.limits.deps import LimitersDep
from gateway.limits.enforce import check_login, check_session
from gateway.principal import Principal, Role, admin_required
from gateway.responses import JSONResponse
from gateway.routing import CREDENTIALS_BODY_BYTES, BodyLimit, GuardedRoute, body_limit
from gateway.users import service as users

router = APIRouter(tags=["auth"], route_class=GuardedRoute)


async def login_rate_limit(request: Request, limiters: LimitersDep, settings: SettingsDep) -> None:
    """Per-IP login attempts (fails closed with 503 while the shared limiter is down)."""
    await check_login(limiter=limiters.strict, settings=settings, request=request)


async def session_rate_limit(
    request: Request, limiters: LimitersDep, settings: SettingsDep
) -> None:
    """Per-IP refreshes and logouts (fails closed with 503 while the shared limiter is down):
    both are public and each costs database writes."""
    await check_session(limiter=limiters.strict, settings=settings, request=request)


# RFC 6749 5.1: responses that carry tokens must not be cached.
_NO_STORE = {"Cache-Control": "no-store", "Pragma": "no-cache"}
_AUTH_ERRORS: dict[int | str, dict[str, str]] = {
    400: {"description": "Malformed request"},
    401: {"description": "Invalid credentials or token"},
}


@router.post(
    "/api/auth/login",
    response_model=TokenResponse,
    openapi_extra=LOGIN_OPENAPI,
    responses=_AUTH_ERRORS,
    dependencies=[Depends(login_rate_limit)],
)
@body_limit(BodyLimit.CREDENTIALS)
async def login(request: Request, settings: SettingsDep, session: SessionDep) -> JSONResponse:
    """Log in with username and password (JSON or an OAuth2 password form): a token pair."""
    return await _login(request, settings, session, admin_only=False)


@router.post(
    "/admin/api/login",
    response_model=TokenResponse,
    openapi_extra=LOGIN_OPENAPI,
    responses={**_AUTH_ERRORS, 403: {"description": "Not an admin"}},
    dependencies=[Depends(login_rate_limit)],
)
@body_limit(BodyLimit.CREDENTIALS)
async def admin_login(request: Request, settings: SettingsDep, session: SessionDep) -> JSONResponse:
    """Log in to the admin console: like /api/auth/login, but only for admins."""
    return await _login(request, settings, session, admin_only=True)


@router.post(
    "/api/auth/refresh",
    response_model=TokenResponse,
    responses=_AUTH_ERRORS,
    dependencies=[Depends(session_rate_limit)],
)
@body_limit(BodyLimit.CREDENTIALS)
async def refresh(body: RefreshRequest, settings: SettingsDep, session: SessionDep) -> JSONResponse:
    """Exchange a refresh token for a new pair; each refresh token works once."""
    pair = await service.refresh(
        session=session, settings=settings, refresh_token=body.refresh_token
    )
    return _token_response(pair)


@router.post(
    "/api/auth/logout",
    status_code=204,
    responses=_AUTH_ERRORS,
    dependencies=[Depends(session_rate_limit)],
)
@body_limit(BodyLimit.CREDENTIALS)
async def logout(
    request: Request,
    settings: SettingsDep,
    session: SessionDep,
    body: LogoutRequest | None = None,
) -> Response:
    """End a session: the refresh token's, or the one of the access token sent (or both)."""
    await service.logout(
        session=session,
        settings=settings,
        refresh_token=body.refresh_token if body is not None else None,
        access_token=bearer_token(request),
    )
    return Response(status_code=204)


@router.get("/api/auth/me", response_model=MeView)
async def me(principal: PrincipalDep, session: SessionDep) -> MeView:
    """The caller's own account."""
    return await _me_view(principal, session)


@router.patch("/api/auth/me", response_model=MeView, responses={403: {"description": "No account"}})
async def update_me(body: MeUpdate, principal: PrincipalDep, session: SessionDep) -> MeView:
    """Change your email or password (the current password is needed for a new one).

    A new password ends all your sessions: log in again.
    """
    if principal.user_id is None:
        raise GatewayError(403, "This caller has no user account.", code="no_account")
    await service.update_own_account(
        session=session,
        user_id=principal.user_id,
        email=body.email,
        set_email="email" in body.model_fields_set,
        current_password=body.current_password,
        new_password=body.new_password,
    )
    return await _me_view(principal, session)


async def _login(
    request: Request, settings: SettingsDep, session: SessionDep, *, admin_only: bool
) -> JSONResponse:
    credentials = parse_login(
        request.headers.get("content-type", ""),
        await read_capped_body(request, CREDENTIALS_BODY_BYTES),
        max_json_depth=settings.MAX_JSON_DEPTH,
    )
    user = await service.authenticate(
        session=session, username=credentials.username, password=credentials.password
    )
    if admin_only and user.role != Role.ADMIN.value:
        raise admin_required()
    pair = await service.issue_tokens(session=session, settings=settings, user=user)
    return _token_response(pair)


async def _me_view(principal: Principal, session: SessionDep) -> MeView:
    user = (
        await users.get_user(session=session, user_id=principal.user_id)
        if principal.user_id is not None
        else None
    )
    return MeView(
        id=principal.user_id,
        username=principal.username,
        role=principal.role,
        tier=principal.tier,
        email=user.email if user is not None else None,
        is_active=user.is_active if user is not None else True,
        via=principal.via,
    )


def _token_response(pair: TokenPair) -> JSONResponse:
    body = TokenResponse(
        access_token=pair.access_token, refresh_token=pair.refresh_token, expires_in=pair.expires_in
    )
    return JSONResponse(body.model_dump(), headers=_NO_STORE)
