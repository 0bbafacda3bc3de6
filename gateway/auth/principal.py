"""Who is calling: one `Principal` per request, from `Authorization: Bearer <credential>`.

The credential is, in this order:

1. the ADMIN_API_KEY (compared in constant time): a break-glass admin for automation and for
   the time before any admin account exists. Leave it unset when accounts are enough;
2. an API key (it starts with API_KEY_PREFIX): the key's owner, with the key's tier and models;
3. a JWT access token: its user and session, checked against the database on a miss and then
   kept in the session cache (`session_cache.py`) for 5 s. Deactivating a user, demoting an
   admin or ending a session through this process takes effect at once; through another
   gateway process (or in the database directly), within those 5 s, as for API keys.

Routes ask for `PrincipalDep` or `AdminDep` (gateway.deps), which call the app's
`CredentialAuthenticator` (this module) through the `gateway.principal.Authenticator` protocol.
The principal also lands on `request.state` (`principal`, `user_id`, `key_id`) for the access log.
"""

from __future__ import annotations

import hmac

from fastapi import Request
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from gateway.auth import service as auth_service
from gateway.auth import tokens
from gateway.auth.session_cache import SESSION_CACHE
from gateway.errors import GatewayError
from gateway.keys.models import ApiKey
from gateway.keys.service import authenticate_key, cached_usable_key
from gateway.limits.base import Limiter
from gateway.limits.enforce import check_admin
from gateway.metrics import count_auth_failure
from gateway.principal import (
    ADMIN_KEY_PRINCIPAL,
    ANONYMOUS,
    Principal,
    admin_required,
    missing_credentials,
)
from gateway.settings import Settings
from gateway.users.models import User

_BEARER = "bearer "
_UNRESOLVED = object()
_SCOPE_KEY = "gateway.principal"


def bearer_token(request: Request) -> str | None:
    """The bearer credential, None when no Authorization header was sent; 401 for other schemes."""
    header = request.headers.get("authorization")
    if header is None:
        return None
    if header[: len(_BEARER)].lower() != _BEARER or not header[len(_BEARER) :].strip():
        raise GatewayError(
            401,
            "Unsupported Authorization header: use 'Bearer <access token or API key>'.",
            code="invalid_credentials",
            headers={"WWW-Authenticate": "Bearer"},
        )
    return header[len(_BEARER) :].strip()


async def resolve_principal(
    request: Request, settings: Settings, session: AsyncSession
) -> Principal | None:
    """The caller, None when no credentials were sent; 401 when the credentials are bad.

    Resolved once per request; later calls return the same principal.
    """
    # Cached in the scope, which is this request's own; `request.state` may be a dict shared
    # with other requests (ASGI servers copy the lifespan state, not every harness does).
    cached = request.scope.get(_SCOPE_KEY, _UNRESOLVED)
    if cached is not _UNRESOLVED:
        return cached if isinstance(cached, Principal) else None
    token = bearer_token(request)
    principal = None if token is None else await _principal_for(token, settings, session)
    _remember(request, principal)
    return principal


def _remember(request: Request, principal: Principal | None) -> None:
    request.scope[_SCOPE_KEY] = principal
    # The request's state dict directly (what `request.state` wraps), for the access log.
    state = request.scope.setdefault("state", {})
    state["principal"] = principal
    state["user_id"] = principal.user_ref if principal else None
    state["key_id"] = principal.key_ref if principal else None


def cached_principal(request: Request, settings: Settings) -> Principal | None:
    """The caller of an API key found in the key cache, or of an access token whose session is
    in the session cache, without a database session; None when the full check is needed (no
    credential, a cache miss, anything else). The hot path of the proxy."""
    header = request.headers.get("authorization")
    if header is None or header[: len(_BEARER)].lower() != _BEARER:
        return None
    token = header[len(_BEARER) :].strip()
    if not token.startswith(settings.API_KEY_PREFIX):
        if not tokens.looks_like_jwt(token):
            return None
        principal = _cached_jwt_principal(token, settings)
        if principal is not None:
            _remember(request, principal)
        return principal
    admin_key = settings.ADMIN_API_KEY
    if admin_key is not None and hmac.compare_digest(
        token.encode(), admin_key.get_secret_value().encode()
    ):
        return None
    found = cached_usable_key(token)
    if found is None:
        return None
    key, user = found
    # The cache hands out the same detached objects for an entry's lifetime: the principal
    # made from them is reused too (reading ORM attributes cost more than the rest).
    memo = _KEY_PRINCIPALS.get(id(key))
    if memo is not None and memo[0] is key:
        principal = memo[1]
    else:
        principal = _key_principal(key, user)
        if len(_KEY_PRINCIPALS) >= _KEY_PRINCIPALS_MAX:
            _KEY_PRINCIPALS.clear()
        _KEY_PRINCIPALS[id(key)] = (key, principal)
    _remember(request, principal)
    return principal


_KEY_PRINCIPALS: dict[int, tuple[ApiKey, Principal]] = {}
_KEY_PRINCIPALS_MAX = 10_000


async def authenticated_principal(
    request: Request, settings: Settings, session: AsyncSession
) -> Principal:
    """The caller; 401 without credentials unless REQUIRE_AUTH is off (then anonymous)."""
    token = bearer_token(request)
    if not settings.REQUIRE_AUTH and token is not None and not _looks_like_ours(token, settings):
        # Clients must send some key (the OpenAI SDK always does: "not-needed" in the seed's
        # examples); with auth off, a token that is neither our key nor a JWT is ignored.
        return ANONYMOUS
    principal = await resolve_principal(request, settings, session)
    if principal is not None:
        return principal
    if not settings.REQUIRE_AUTH:
        return ANONYMOUS
    raise missing_credentials()


def _looks_like_ours(token: str, settings: Settings) -> bool:
    return token.startswith(settings.API_KEY_PREFIX) or token.count(".") == 2


async def admin_principal(request: Request, settings: Settings, session: AsyncSession) -> Principal:
    """An admin caller; 401 without credentials (whatever REQUIRE_AUTH says), 403 otherwise."""
    try:
        principal = await resolve_principal(request, settings, session)
    except GatewayError as exc:
        token = _raw_bearer(request)
        if (
            exc.status_code == 401
            and settings.ADMIN_API_KEY is None
            and token is not None
            and not tokens.looks_like_jwt(token)
            and not token.startswith(settings.API_KEY_PREFIX)
        ):
            # An admin-key-shaped credential while admin keys are switched off: say so, as the
            # model API always has, instead of a bare "invalid".
            raise GatewayError(
                403,
                "The admin key is disabled (ADMIN_API_KEY is not set): "
                "log in as an admin user (POST /admin/api/login) instead.",
                code="admin_disabled",
            ) from None
        raise
    if principal is None:
        raise missing_credentials()
    if not principal.is_admin:
        raise admin_required()
    return principal


def _raw_bearer(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    if header[: len(_BEARER)].lower() != _BEARER:
        return None
    return header[len(_BEARER) :].strip() or None


async def _principal_for(token: str, settings: Settings, session: AsyncSession) -> Principal:
    admin_key = settings.ADMIN_API_KEY
    # Constant-time: the time taken says nothing about how much of the key matched.
    if admin_key is not None and hmac.compare_digest(
        token.encode(), admin_key.get_secret_value().encode()
    ):
        return ADMIN_KEY_PRINCIPAL
    # A database that is down fails closed: the app's handler (gateway.errors) answers 503
    # with Retry-After, which says it is temporary (the credentials may well be fine).
    if token.startswith(settings.API_KEY_PREFIX):
        return await _api_key_principal(token, settings, session)
    return await _jwt_principal(token, settings, session)


async def _jwt_principal(token: str, settings: Settings, session: AsyncSession) -> Principal:
    claims = tokens.decode_token(settings, token, expected_type="access")
    cached = SESSION_CACHE.get(claims.user_id, claims.family_id)
    if cached is not None:
        return cached
    generation = SESSION_CACHE.generation
    user = await auth_service.load_session_user(
        session=session, user_id=claims.user_id, family_id=claims.family_id
    )
    if user is None:
        raise tokens.invalid_token()
    principal = Principal(
        user_id=user.id, username=user.username, role=user.role, tier=user.tier, via="jwt"
    )
    SESSION_CACHE.put(claims.user_id, claims.family_id, principal, generation=generation)
    return principal


def _cached_jwt_principal(token: str, settings: Settings) -> Principal | None:
    """The principal of a valid access token whose session is in the session cache; None when
    the full check is needed (a miss, or a token that does not verify: the full check says why).

    An access token that verified once is remembered until it expires, so a client sending the
    same token again is not verified again: bench/proxy.py measured verifying (PyJWT: header,
    signature, claims) at about 190 us of CPU per request, most of the JWT path's cost."""
    verified = SESSION_CACHE.verified(token)
    if verified is None:
        try:
            claims = tokens.decode_token(settings, token, expected_type="access")
        except GatewayError:
            return None
        verified = (claims.user_id, claims.family_id)
        SESSION_CACHE.remember_verified(token, *verified, claims.expires_at.timestamp())
    return SESSION_CACHE.get(*verified)


async def _api_key_principal(token: str, settings: Settings, session: AsyncSession) -> Principal:
    found = await authenticate_key(session=session, raw_key=token, settings=settings)
    if found is None or not found[1].is_active:
        raise _invalid_api_key()
    return _key_principal(*found)


def _key_principal(key: ApiKey, user: User) -> Principal:
    return Principal(
        user_id=user.id,
        username=user.username,
        role=user.role,
        tier=key.tier,
        via="api_key",
        key_id=key.id,
        allowed_models=tuple(key.allowed_models) if key.allowed_models is not None else None,
        allowed_fields=tuple(key.allowed_fields or ()),
    )


def _invalid_api_key() -> GatewayError:
    return GatewayError(
        401,
        "Invalid API key.",
        code="invalid_api_key",
        headers={"WWW-Authenticate": 'Bearer error="invalid_token"'},
    )


class CredentialAuthenticator:
    """The app's `Authenticator`: credentials checked against the settings, the key cache and
    the database; refusals counted; the admin API limited per caller."""

    def __init__(
        self,
        *,
        settings: Settings,
        session_factory: async_sessionmaker[AsyncSession],
        admin_limiter: Limiter,
    ) -> None:
        self._settings = settings
        self._sessions = session_factory
        self._admin_limiter = admin_limiter

    async def principal(self, request: Request) -> Principal:
        """The caller: 401 without valid credentials (anonymous only when REQUIRE_AUTH is off)."""
        settings = self._settings
        if not settings.REQUIRE_AUTH and "authorization" not in request.headers:
            # The hot path of a single-user setup: no credentials, nothing to look up.
            return ANONYMOUS
        # A key in the key cache needs no session; one is opened only when credentials must be
        # checked against the database.
        cached = cached_principal(request, settings)
        if cached is not None:
            return cached
        async with self._sessions() as session:
            try:
                return await authenticated_principal(request, settings, session)
            except GatewayError as exc:
                _count_refusal(exc)
                raise

    async def admin(self, request: Request) -> Principal:
        """An admin caller (401/403), then the per-caller admin limit: 429 when over, 503 while
        the shared limiter is down. Every admin route resolves its caller here."""
        async with self._sessions() as session:
            try:
                principal = await admin_principal(request, self._settings, session)
            except GatewayError as exc:
                _count_refusal(exc)
                raise
        await check_admin(limiter=self._admin_limiter, settings=self._settings, principal=principal)
        return principal


def _count_refusal(exc: GatewayError) -> None:
    # 401/403 are refused credentials; a 503 (database down) is not the caller's failure.
    if exc.status_code in (401, 403):
        count_auth_failure(exc.code)
