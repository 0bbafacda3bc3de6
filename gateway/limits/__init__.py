"""Rate limits: GCRA rules per tier, IP, login, session and admin caller, shared through Redis or
held per process."""

from gateway.limits.base import Decision, Limiter, LimiterUnavailable, RuleState
from gateway.limits.factory import Limiters, build_limiters
from gateway.limits.local import LocalLimiter
from gateway.limits.redis_limiter import RedisLimiter
from gateway.limits.resilience import FailClosedLimiter, FallbackLimiter
from gateway.limits.rules import (
    Rule,
    TierRules,
    admin_rules,
    ip_rules,
    login_rules,
    session_rules,
    tier_rules,
)

__all__ = [
    "Decision",
    "FailClosedLimiter",
    "FallbackLimiter",
    "Limiter",
    "LimiterUnavailable",
    "Limiters",
    "LocalLimiter",
    "RedisLimiter",
    "Rule",
    "RuleState",
    "TierRules",
    "admin_rules",
    "build_limiters",
    "ip_rules",
    "login_rules",
    "session_rules",
    "tier_rules",
]
