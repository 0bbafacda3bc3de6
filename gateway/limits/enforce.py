"""What the routes call: who is counted, which rules apply, and the 429s."""

from __future__ import annotations

import ipaddress

from fastapi import Request

from gateway.errors import GatewayError
from gateway.limits.base import Decision, Limiter, LimiterUnavailable
from gateway.limits.rules import (
    Rule,
    admin_rules,
    ip_rules,
    login_rules,
    session_rules,
    tier_rules,
)
from gateway.metrics import count_rate_limited
from gateway.principal import Principal
from gateway.settings import Settings


def client_ip(request: Request, settings: Settings) -> str:
    """The caller's address; X-Forwarded-For is believed only from a trusted proxy."""
    peer = request.client.host if request.client else "unknown"
    if not settings.is_trusted_proxy(peer):
        return peer
    forwarded = request.headers.get("x-forwarded-for", "")
    # The right-most address not added by one of our proxies is the client.
    for hop in reversed([part.strip() for part in forwarded.split(",") if part.strip()]):
        if settings.is_trusted_proxy(hop):
            continue
        try:
            return str(ipaddress.ip_address(hop))
        except ValueError:
            break
    return peer


def subject(principal: Principal, request: Request, settings: Settings) -> str:
    """The limiter key: the API key, else the user, else the client IP."""
    if principal.key_id is not None:
        return f"key:{principal.key_id}"
    if principal.user_id is not None:
        return f"user:{principal.user_id}"
    return f"ip:{client_ip(request, settings)}"


def _denied(decision: Decision, what: str, code: str) -> GatewayError:
    return GatewayError(
        429,
        f"Rate limit exceeded ({what}); retry after {decision.retry_after_s}s.",
        code=code,
        headers=decision.headers(),
    )


def _unavailable(exc: LimiterUnavailable) -> GatewayError:
    return GatewayError(
        503,
        "Rate limiting is unavailable, so this route is closed for now; retry shortly.",
        code="limiter_unavailable",
        headers={"Retry-After": str(exc.retry_after_s)},
    )


async def check_inference(
    *, limiter: Limiter, settings: Settings, principal: Principal, request: Request
) -> tuple[str, tuple[Rule, ...], dict[str, str]]:
    """Count one request (and check the token budget); 429 when over; returns what to add to
    later (key, token rules) and the X-RateLimit-* headers."""
    key = subject(principal, request, settings)
    if principal.via == "admin_key":
        return key, (), {}
    rules = tier_rules(settings, principal.tier)
    tokens = rules.tokens
    # Without credentials (REQUIRE_AUTH off) a client is its IP, under the per-IP limit.
    requests = ip_rules(settings) if principal.via == "anonymous" else rules.requests
    # The token budget gates the request count, in one atomic call (one Redis round trip):
    # a request refused for tokens must not spend a request unit too (a client retrying
    # through a token wait would otherwise burn its hourly requests).
    budget, decision = await limiter.gated_hit(key, tokens, requests)
    if not budget.allowed:
        count_rate_limited(_tier_label(principal), "tokens")
        raise _denied(budget, "tokens per minute", "token_rate_limit_exceeded")
    if not decision.allowed:
        count_rate_limited(_tier_label(principal), "requests")
        raise _denied(decision, "requests", "rate_limit_exceeded")
    return key, tokens, {**decision.headers(), **budget.headers()}


async def check_login(*, limiter: Limiter, settings: Settings, request: Request) -> None:
    """Per-IP limit on login; fails closed (503) when the shared limiter is down."""
    key = f"login:{client_ip(request, settings)}"
    await _strict(limiter, key, login_rules(settings), "login attempts", "login")


async def check_session(*, limiter: Limiter, settings: Settings, request: Request) -> None:
    """Per-IP limit on refresh and logout (one budget for both); fails closed (503) when the
    shared limiter is down."""
    key = f"session:{client_ip(request, settings)}"
    await _strict(limiter, key, session_rules(settings), "token refreshes and logouts", "session")


async def check_admin(*, limiter: Limiter, settings: Settings, principal: Principal) -> None:
    """Per-caller limit on the admin API; fails closed (503) when the shared limiter is down."""
    if principal.key_id is not None:
        key = f"admin:key:{principal.key_id}"
    elif principal.user_id is not None:
        key = f"admin:user:{principal.user_id}"
    else:  # the ADMIN_API_KEY: one caller, wherever it calls from
        key = f"admin:{principal.via}"
    await _strict(limiter, key, admin_rules(settings), "admin requests", "admin")


async def _strict(
    limiter: Limiter, key: str, rules: tuple[Rule, ...], what: str, label: str
) -> None:
    """One ``hit`` on the strict limiter: 429 when over, 503 when it cannot be asked."""
    try:
        decision = await limiter.hit(key, rules)
    except LimiterUnavailable as exc:
        raise _unavailable(exc) from None
    if not decision.allowed:
        count_rate_limited("none", label)
        raise _denied(decision, what, "rate_limit_exceeded")


def _tier_label(principal: Principal) -> str:
    # Callers without credentials are limited per IP, not by a tier.
    return "anonymous" if principal.via == "anonymous" else principal.tier
