"""Rate-limit rules (how much per how long) and the rule sets the gateway applies."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from gateway.principal import Tier
from gateway.settings import Settings

MICROS_PER_S = 1_000_000
# Keeps every time value the limiters compute below 2**53 (exact in Lua's doubles).
MAX_WINDOW_S = 366 * 24 * 3600

_RULE_NAME = re.compile(r"^[a-z0-9]+(?:-[a-z0-9]+)*$")
_WINDOW_NAMES = {1: "second", 60: "minute", 3600: "hour", 86400: "day"}


@dataclass(frozen=True)
class Rule:
    """At most ``limit`` units (requests, tokens) per ``window_s`` seconds.

    ``name`` becomes part of the storage key and of the response headers
    (``"tokens-minute"`` → ``X-RateLimit-Limit-Tokens-Minute``).
    """

    name: str
    limit: int
    window_s: int
    # Derived once (every limiter call reads them): the name as it appears in headers
    # (``tokens-minute`` → ``Tokens-Minute``), and the microseconds one unit occupies: the
    # window divided by the limit, rounded up (keeps the sustained rate at or below
    # ``limit / window_s``).
    header_name: str = field(init=False, repr=False, compare=False)
    interval_us: int = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not _RULE_NAME.match(self.name):
            raise ValueError(f"rule name {self.name!r} must be lowercase words joined by '-'")
        if not 1 <= self.window_s <= MAX_WINDOW_S:
            raise ValueError(f"rule {self.name}: window_s must be 1..{MAX_WINDOW_S}")
        if not 1 <= self.limit <= self.window_s * MICROS_PER_S:
            raise ValueError(
                f"rule {self.name}: limit must be 1..{self.window_s * MICROS_PER_S} "
                "(a limit of 0 means unlimited: leave the rule out)"
            )
        header = "-".join(part.capitalize() for part in self.name.split("-"))
        object.__setattr__(self, "header_name", header)
        object.__setattr__(self, "interval_us", -(-self.window_s * MICROS_PER_S // self.limit))


@dataclass(frozen=True)
class TierRules:
    """The rules of one tier: request counts (checked with ``hit``) and token budgets
    (``peek`` before a request, ``add`` after it)."""

    requests: tuple[Rule, ...]
    tokens: tuple[Rule, ...]


def _rules(*candidates: tuple[str, int, int]) -> tuple[Rule, ...]:
    """Rules for the (name, limit, window) triples whose limit is not 0 (0 means unlimited)."""
    return tuple(Rule(name, limit, window) for name, limit, window in candidates if limit > 0)


# Rules per (settings object, tier), built once: the proxy asks on every request.
_TIER_CACHE: dict[tuple[int, str], tuple[Settings, TierRules]] = {}


def tier_rules(settings: Settings, tier: Tier | str) -> TierRules:
    """Request and token rules of a tier from ``RATE_LIMIT_<TIER>_*``; raises ValueError for an
    unknown tier."""
    cache_key = (id(settings), str(tier))
    cached = _TIER_CACHE.get(cache_key)
    if cached is not None and cached[0] is settings:
        return cached[1]
    rules = _build_tier_rules(settings, tier)
    if len(_TIER_CACHE) > 64:  # many Settings objects only in tests
        _TIER_CACHE.clear()
    _TIER_CACHE[cache_key] = (settings, rules)
    return rules


def _build_tier_rules(settings: Settings, tier: Tier | str) -> TierRules:
    prefix = f"RATE_LIMIT_{Tier(tier).name}"
    per_minute: int = getattr(settings, f"{prefix}_PER_MINUTE")
    per_hour: int = getattr(settings, f"{prefix}_PER_HOUR")
    tokens_per_minute: int = getattr(settings, f"{prefix}_TOKENS_PER_MINUTE")
    return TierRules(
        requests=_rules(("minute", per_minute, 60), ("hour", per_hour, 3600)),
        tokens=_rules(("tokens-minute", tokens_per_minute, 60)),
    )


def ip_rules(settings: Settings) -> tuple[Rule, ...]:
    """Per-IP rule for routes without credentials: RATE_LIMIT_REQUESTS per RATE_LIMIT_WINDOW."""
    window = settings.RATE_LIMIT_WINDOW
    return _rules((_WINDOW_NAMES.get(window, "window"), settings.RATE_LIMIT_REQUESTS, window))


def login_rules(settings: Settings) -> tuple[Rule, ...]:
    """Per-IP rule for login attempts: LOGIN_RATE_LIMIT_PER_MINUTE per minute."""
    return _rules(("minute", settings.LOGIN_RATE_LIMIT_PER_MINUTE, 60))


def session_rules(settings: Settings) -> tuple[Rule, ...]:
    """Per-IP rule for token refreshes and logouts: SESSION_RATE_LIMIT_PER_MINUTE per minute."""
    return _rules(("minute", settings.SESSION_RATE_LIMIT_PER_MINUTE, 60))


def admin_rules(settings: Settings) -> tuple[Rule, ...]:
    """Per-caller rule for the admin API: ADMIN_RATE_LIMIT_PER_MINUTE per minute."""
    return _rules(("minute", settings.ADMIN_RATE_LIMIT_PER_MINUTE, 60))
