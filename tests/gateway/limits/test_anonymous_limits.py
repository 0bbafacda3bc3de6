"""Callers without credentials (REQUIRE_AUTH=false) are limited per IP: RATE_LIMIT_REQUESTS per
RATE_LIMIT_WINDOW, in the shared Redis, with the usual X-RateLimit-* headers and 429."""

from __future__ import annotations

import httpx
import pytest

from tests.helpers.quota import (
    Gateway,
    bearer,
    chat,
    create_key,
    error_code,
    quota_gateway,
    quota_settings,
    remaining,
)

pytestmark = [pytest.mark.postgres, pytest.mark.redis]

LIMIT = 3
KEY_LIMIT = 50
ANONYMOUS: dict[str, str] = {}
# The gateway's peer is 127.0.0.1 here, trusted as a proxy so that other clients can be named.
ELSEWHERE = {"X-Forwarded-For": "198.51.100.23"}


async def _engine_requests(gw: Gateway) -> int:
    return int((await gw.sim_stats())["requests_total"])


@pytest.mark.parametrize(("window", "rule"), [(60, "Minute"), (3600, "Hour"), (600, "Window")])
async def test_the_n_plus_first_anonymous_request_from_one_ip_is_429(
    pg_url: str, redis_url: str, window: int, rule: str
) -> None:
    settings = quota_settings(
        pg_url,
        REQUIRE_AUTH=False,
        REDIS_URL=redis_url,
        RATE_LIMIT_REQUESTS=LIMIT,
        RATE_LIMIT_WINDOW=window,
        TRUSTED_PROXIES="127.0.0.1",
        RATE_LIMIT_FREE_PER_MINUTE=KEY_LIMIT,
    )
    async with quota_gateway(settings) as gw:
        http = gw.http
        before = await _engine_requests(gw)
        allowed = [await chat(http, ANONYMOUS, stream=n == 1) for n in range(LIMIT)]
        denied = await chat(http, ANONYMOUS)
        denied_stream = await chat(http, ANONYMOUS, stream=True)
        served = await _engine_requests(gw) - before
        # Another IP has its own budget; a key is counted per key, not by its caller's IP.
        elsewhere = await chat(http, ELSEWHERE)
        key = bearer((await create_key(http, "scripts", tier="free"))["key"])
        keyed = await chat(http, key)
    for n, reply in enumerate(allowed):
        assert reply.status_code == 200, reply.text
        assert reply.headers[f"X-RateLimit-Limit-{rule}"] == str(LIMIT)
        assert remaining(reply, rule) == LIMIT - 1 - n
        assert "Retry-After" not in reply.headers
    for reply in (denied, denied_stream):
        _assert_limited(reply, window, rule)
    # Refused requests never reached the engine.
    assert served == LIMIT
    assert elsewhere.status_code == 200, elsewhere.text
    assert remaining(elsewhere, rule) == LIMIT - 1
    assert keyed.status_code == 200, keyed.text
    # Under its tier's rule only: the per-IP rule is not applied to it.
    assert keyed.headers["X-RateLimit-Limit-Minute"] == str(KEY_LIMIT)
    assert keyed.headers.get(f"X-RateLimit-Limit-{rule}") in (None, str(KEY_LIMIT))


def _assert_limited(reply: httpx.Response, window: int, rule: str) -> None:
    assert reply.status_code == 429, reply.text
    assert error_code(reply) == "rate_limit_exceeded"
    assert reply.json()["error"]["type"] == "rate_limit_error"
    # GCRA: after a burst of LIMIT, one more fits every window / LIMIT seconds.
    assert 1 <= int(reply.headers["Retry-After"]) <= window // LIMIT + 1
    assert reply.headers[f"X-RateLimit-Limit-{rule}"] == str(LIMIT)
    assert remaining(reply, rule) == 0
