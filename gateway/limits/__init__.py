"""Rate limits: GCRA rules per tier, IP and login, shared through Redis or held per process."""

from gateway.limits.base import Decision, Limiter, LimiterUnavailable, RuleState
from gateway.limits.factory import Limiters, build_limiters
from gateway.limits.local import LocalLimiter
from gateway.limits.redis_limiter import RedisLimiter
from gateway.limits.resilience import FailClosedLimiter, FallbackLimiter
from gateway.limits.rules import Rule, TierRules, ip_rules, login_rules, tier_rules

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
    "build_limiters",
    "ip_rules",
    "login_rules",
    "tier_rules",
]
