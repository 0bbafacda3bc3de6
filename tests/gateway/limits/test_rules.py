"""Rules from settings, rule validation, and the response headers of a decision."""

from __future__ import annotations

import pytest

from gateway.limits import (
    LocalLimiter,
    Rule,
    TierRules,
    admin_rules,
    ip_rules,
    login_rules,
    session_rules,
    tier_rules,
)
from gateway.principal import Tier
from tests.helpers.app import make_settings


def test_tier_rules_from_the_default_settings() -> None:
    settings = make_settings()
    assert tier_rules(settings, Tier.STANDARD) == TierRules(
        requests=(Rule("minute", 30, 60), Rule("hour", 300, 3600)),
        tokens=(Rule("tokens-minute", 50_000, 60),),
    )
    assert tier_rules(settings, "free") == TierRules(
        requests=(Rule("minute", 10, 60), Rule("hour", 100, 3600)),
        tokens=(Rule("tokens-minute", 10_000, 60),),
    )
    assert tier_rules(settings, "premium").requests == (
        Rule("minute", 100, 60),
        Rule("hour", 1000, 3600),
    )
    with pytest.raises(ValueError, match="gold"):
        tier_rules(settings, "gold")


def test_a_zero_limit_means_unlimited() -> None:
    settings = make_settings(
        RATE_LIMIT_PREMIUM_PER_HOUR=0, RATE_LIMIT_PREMIUM_TOKENS_PER_MINUTE=0, RATE_LIMIT_REQUESTS=0
    )
    assert tier_rules(settings, Tier.PREMIUM) == TierRules(
        requests=(Rule("minute", 100, 60),), tokens=()
    )
    assert ip_rules(settings) == ()
    with pytest.raises(ValueError, match="unlimited"):
        Rule("minute", 0, 60)


def test_ip_and_login_rules() -> None:
    assert ip_rules(make_settings()) == (Rule("hour", 100, 3600),)
    assert ip_rules(make_settings(RATE_LIMIT_REQUESTS=20, RATE_LIMIT_WINDOW=60)) == (
        Rule("minute", 20, 60),
    )
    assert ip_rules(make_settings(RATE_LIMIT_WINDOW=900)) == (Rule("window", 100, 900),)
    assert login_rules(make_settings()) == (Rule("minute", 10, 60),)
    assert login_rules(make_settings(LOGIN_RATE_LIMIT_PER_MINUTE=3)) == (Rule("minute", 3, 60),)


def test_session_and_admin_rules() -> None:
    assert session_rules(make_settings()) == (Rule("minute", 60, 60),)
    assert session_rules(make_settings(SESSION_RATE_LIMIT_PER_MINUTE=5)) == (Rule("minute", 5, 60),)
    assert admin_rules(make_settings()) == (Rule("minute", 600, 60),)
    assert admin_rules(make_settings(ADMIN_RATE_LIMIT_PER_MINUTE=7)) == (Rule("minute", 7, 60),)


@pytest.mark.parametrize(
    ("name", "limit", "window_s", "message"),
    [
        ("Minute", 1, 60, "lowercase"),
        ("a:b", 1, 60, "lowercase"),
        ("tokens--minute", 1, 60, "lowercase"),
        ("minute", 1, 0, "window_s"),
        ("year", 1, 400 * 86400, "window_s"),
        ("second", 1_000_001, 1, "limit"),
    ],
)
def test_invalid_rules_are_refused(name: str, limit: int, window_s: int, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Rule(name, limit, window_s)


def test_rule_header_names_and_intervals() -> None:
    assert Rule("minute", 30, 60).header_name == "Minute"
    assert Rule("tokens-minute", 50_000, 60).header_name == "Tokens-Minute"
    assert Rule("minute", 30, 60).interval_us == 2_000_000
    assert Rule("second", 7, 1).interval_us == 142_858  # rounded up: never faster than the limit


async def test_headers_of_an_allowed_and_a_denied_decision() -> None:
    limiter = LocalLimiter()
    rules = tier_rules(make_settings(RATE_LIMIT_STANDARD_PER_MINUTE=2), Tier.STANDARD)
    allowed = await limiter.hit("user:1", rules.requests)
    assert allowed.headers() == {
        "X-RateLimit-Limit-Minute": "2",
        "X-RateLimit-Remaining-Minute": "1",
        "X-RateLimit-Limit-Hour": "300",
        "X-RateLimit-Remaining-Hour": "299",
    }
    await limiter.hit("user:1", rules.requests)
    denied = await limiter.hit("user:1", rules.requests)
    assert denied.headers() == {
        "X-RateLimit-Limit-Minute": "2",
        "X-RateLimit-Remaining-Minute": "0",
        "X-RateLimit-Limit-Hour": "300",
        "X-RateLimit-Remaining-Hour": "298",
        "Retry-After": "30",
    }
    tokens = await limiter.peek("user:1", rules.tokens)
    assert tokens.headers() == {
        "X-RateLimit-Limit-Tokens-Minute": "50000",
        "X-RateLimit-Remaining-Tokens-Minute": "50000",
    }
    with pytest.raises(KeyError):
        tokens.rule("minute")
