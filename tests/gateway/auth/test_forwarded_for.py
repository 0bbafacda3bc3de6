"""The login limit counts the real client: X-Forwarded-For is believed only from TRUSTED_PROXIES.

The test client's peer address is 127.0.0.1 (httpx's ASGI transport); the login budget lives in
a real Redis, as in a deployment with several gateway processes.
"""

from __future__ import annotations

import httpx
import pytest
from fastapi import FastAPI

from gateway.limits.rules import login_rules
from tests.helpers.app import running_app
from tests.helpers.auth import ADMIN_PASSWORD, auth_settings

pytestmark = [pytest.mark.postgres, pytest.mark.redis]

LIMIT = 3
PEER = "127.0.0.1"
WRONG = {"username": "admin", "password": "wrong-guess"}
RIGHT = {"username": "admin", "password": ADMIN_PASSWORD}


async def _login(
    client: httpx.AsyncClient,
    forwarded: str | None = None,
    body: dict[str, str] = WRONG,
    path: str = "/api/auth/login",
) -> httpx.Response:
    headers = {} if forwarded is None else {"X-Forwarded-For": forwarded}
    return await client.post(path, json=body, headers=headers)


async def _left(app: FastAPI, ip: str) -> int:
    """Login attempts left to `ip` in the shared limiter (peek: spends nothing)."""
    limiter = app.state.resources.limiters.strict
    decision = await limiter.peek(f"login:{ip}", login_rules(app.state.settings))
    return int(decision.rule("minute").remaining)


def _assert_limited(response: httpx.Response) -> None:
    assert response.status_code == 429, response.text
    assert response.json()["error"]["code"] == "rate_limit_exceeded"
    assert int(response.headers["Retry-After"]) >= 1
    assert response.headers["X-RateLimit-Limit-Minute"] == str(LIMIT)
    assert response.headers["X-RateLimit-Remaining-Minute"] == "0"


async def test_spoofed_forwarded_for_from_an_untrusted_peer_counts_against_the_peer(
    pg_url: str, redis_url: str
) -> None:
    # A proxy is configured, but it is not the caller: the caller's header is not believed.
    settings = auth_settings(
        pg_url,
        REDIS_URL=redis_url,
        LOGIN_RATE_LIMIT_PER_MINUTE=LIMIT,
        TRUSTED_PROXIES="10.9.8.7",
    )
    async with running_app(settings) as (app, client):
        # A fresh value each time, as a password guesser would send to look like many clients.
        spoofed = [await _login(client, f"203.0.113.{n}") for n in range(1, LIMIT + 3)]
        # The trusted proxy's address in the header does not make the caller that proxy.
        as_proxy = await _login(client, "10.9.8.7")
        correct = await _login(client, "198.51.100.1", RIGHT)
        admin_login = await _login(client, "198.51.100.2", RIGHT, "/admin/api/login")
        peer_left = await _left(app, PEER)
        spoofed_left = [await _left(app, f"203.0.113.{n}") for n in (1, 2)]
    assert [r.status_code for r in spoofed] == [401] * LIMIT + [429, 429]
    for response in (*spoofed[LIMIT:], as_proxy, correct, admin_login):
        _assert_limited(response)
    assert peer_left == 0
    # Nothing was counted for the addresses the caller made up.
    assert spoofed_left == [LIMIT, LIMIT]


async def test_behind_a_trusted_proxy_the_forwarded_client_is_counted(
    pg_url: str, redis_url: str
) -> None:
    settings = auth_settings(
        pg_url,
        REDIS_URL=redis_url,
        LOGIN_RATE_LIMIT_PER_MINUTE=LIMIT,
        TRUSTED_PROXIES=f"10.9.8.7,{PEER}",
    )
    client_ip = "203.0.113.7"
    async with running_app(settings) as (app, client):
        mine = [await _login(client, client_ip) for _ in range(LIMIT)]
        over = await _login(client, client_ip, RIGHT)
        # The client may prepend anything: our proxy appends the address it saw, and the
        # right-most address not added by a trusted proxy is the client.
        prepended = await _login(client, f"192.0.2.1, {client_ip}")
        # A chain through two trusted proxies still ends at the same client.
        chained = await _login(client, f"{client_ip}, 10.9.8.7")
        # Other clients behind the proxy have budgets of their own...
        other = await _login(client, "203.0.113.8", RIGHT)
        ipv6 = await _login(client, "2001:db8::1")
        # ...and so has the proxy itself (no header, or one that is not an address).
        direct = await _login(client)
        garbage = await _login(client, "not-an-address")
        left = {ip: await _left(app, ip) for ip in (client_ip, "203.0.113.8", "2001:db8::1", PEER)}
    assert [r.status_code for r in mine] == [401] * LIMIT
    for response in (over, prepended, chained):
        _assert_limited(response)
    assert other.status_code == 200, other.text
    assert ipv6.status_code == 401
    assert direct.status_code == 401
    assert garbage.status_code == 401
    assert left == {client_ip: 0, "203.0.113.8": LIMIT - 1, "2001:db8::1": LIMIT - 1, PEER: 1}
