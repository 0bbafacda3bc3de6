"""No request body can exhaust the gateway's memory (gateway/routing.py, gateway/body.py).

A body far over its route's cap, sent to a real gateway process over a real socket, to every
route that can take a body (read from the app's routes, so a new route is covered), with no
credentials and with an admin's, declared (Content-Length) and streamed (chunked):

- is refused while the client is still sending it: 413 when its declared length is over the
  cap; streamed, 401 first where the credentials are headers and none were sent, else 413 once
  the cap is passed (a route that takes no body answers without reading it);
- and the process's peak RSS (VmHWM) grows by no more than twice the largest cap over all of it.

Before the guard, FastAPI parsed a pydantic body in full before any dependency ran: 300 MB sent
without credentials to /api/auth/refresh took the gateway from 190 MB to about 1 GB.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from gateway.app import create_app
from gateway.errors import GatewayError
from gateway.proxy.validation import OPENAI_PATHS
from gateway.routing import (
    CREDENTIALS_BODY_BYTES,
    BodyLimit,
    GuardedRoute,
    limit_bytes,
    parse_json,
)
from gateway.settings import Settings
from tests.helpers.app import make_settings, running_app
from tests.helpers.gateway_process import gateway_process
from tests.helpers.routes import BODY_METHODS, body_routes, concrete, flat_routes, original_route

ADMIN_KEY = "sk-admin-routing-Hq3Vb8Lm1Zx6Tc9Rw4Ny"
CHUNK = 256 * 1024
# What the kernel and the server's reader may hold of a body the gateway never asked for: the
# socket buffers on both sides (a few MiB each on loopback) and the server's read buffer.
IN_FLIGHT_BYTES = 24 * 1024 * 1024


def test_every_route_that_can_take_a_body_is_guarded() -> None:
    app = create_app(make_settings())
    found = body_routes(app)
    paths = {path for _, path, _ in found}
    # The routes the guard was written for are among them (the enumeration sees them).
    assert {"/api/auth/refresh", "/api/chat", "/api/keys", "/api/conversations/import"} <= paths
    assert {"/v1/chat/completions", "/v1/completions", "/v1/embeddings"} <= paths
    assert set(OPENAI_PATHS) <= paths
    unguarded = sorted(
        f"{method} {path}" for method, path, route in found if not isinstance(route, GuardedRoute)
    )
    assert unguarded == [], f"give these routers route_class=GuardedRoute: {unguarded}"
    # A route that reads its body itself must say so, or the guard would not know it takes one.
    for leaf in flat_routes(app.routes):
        route = original_route(leaf)
        if isinstance(route, GuardedRoute) and route.body_field is None:
            # The logins, the engine routes (/v1/*, /tokenize, seed 004's /api/v1/*) and
            # the multipart transcription route.
            reads_itself = route.path in {
                "/api/auth/login",
                "/admin/api/login",
                "/v1/audio/transcriptions",
            } or (route.path in OPENAI_PATHS and "POST" in (route.methods or ()))
            assert route.takes_body == reads_itself, route.path


@dataclass
class Answer:
    """What came back, and how much of the body had been sent when it did."""

    status: int
    sent: int


def send_oversized(
    port: int, method: str, path: str, *, total: int, chunked: bool, token: str | None
) -> Answer:
    """Send a `total`-byte JSON body (generated as it goes, never held) over a raw socket; stop
    sending as soon as the response has come. Blocking, with the sending on its own thread: a
    refused body ends in a reset of the connection, which must not cost the reading side the
    response (an asyncio transport drops what it has not read when a write fails)."""
    head = [
        f"{method} {path} HTTP/1.1",
        f"Host: 127.0.0.1:{port}",
        "Content-Type: application/json",
        "Connection: close",
        "Transfer-Encoding: chunked" if chunked else f"Content-Length: {total}",
    ]
    if token is not None:
        head.append(f"Authorization: Bearer {token}")
    sock = socket.create_connection(("127.0.0.1", port), timeout=60)
    sent = 0
    answered = threading.Event()

    def send_body() -> None:
        nonlocal sent
        opening = b'{"refresh_token": "'
        try:
            sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode())
            while sent < total and not answered.is_set():
                size = min(CHUNK, total - sent)
                data = opening + b"a" * (size - len(opening)) if sent == 0 else b"a" * size
                sock.sendall(f"{size:x}\r\n".encode() + data + b"\r\n" if chunked else data)
                sent += size
            if chunked and not answered.is_set():
                sock.sendall(b"0\r\n\r\n")
        except OSError:
            pass  # the server answered and closed the connection: what the test wants

    sender = threading.Thread(target=send_body, daemon=True)
    sender.start()
    received = b""
    try:
        while b"\r\n" not in received:
            part = sock.recv(65536)
            if not part:
                break
            received += part
    finally:
        at_response = sent
        answered.set()
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)  # unblocks a send waiting on full buffers
        sender.join(30)
        sock.close()
    status_line = received.split(b"\r\n", 1)[0]
    assert status_line.startswith(b"HTTP/1.1 "), received[:200]
    return Answer(int(status_line.split()[1]), at_response)


def peak_rss(pid: int) -> int:
    """The process's peak resident set size (VmHWM), in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM in /proc/<pid>/status")


async def test_bodies_far_over_the_cap_are_refused_at_once_on_every_route(
    tmp_path: Path,
) -> None:
    # The shipped caps: what is checked is what an operator runs.
    settings = make_settings(REQUIRE_AUTH=True, ADMIN_API_KEY=ADMIN_KEY)
    app = create_app(settings)
    routes: list[tuple[str, str, GuardedRoute]] = []
    for method, path, route in body_routes(app):
        assert isinstance(route, GuardedRoute), path
        if method in BODY_METHODS:
            routes.append((method, concrete(path), route))
    caps = {id(route): limit_bytes(route.body_limit, settings) for _, _, route in routes}
    largest = max(caps.values())
    assert largest == settings.MAX_IMPORT_BYTES
    async with gateway_process(None, tmp_path, REQUIRE_AUTH="true", ADMIN_API_KEY=ADMIN_KEY) as (
        client,
        process,
    ):
        port = client.base_url.port
        assert port is not None
        # Warm up: each route once with a small body, so what is measured is the bodies alone.
        for method, path, _ in routes:
            for headers in ({}, {"Authorization": f"Bearer {ADMIN_KEY}"}):
                warm = await client.request(method, path, content=b"{}", headers=headers)
                assert warm.status_code < 500, (method, path, warm.text)
        before = peak_rss(process.pid)
        for method, path, route in routes:
            cap = caps[id(route)]
            total = 8 * largest  # far over every cap
            for token in (None, ADMIN_KEY):
                for chunked in (False, True):
                    label = f"{method} {path} chunked={chunked} auth={token is not None}"
                    answer = await asyncio.to_thread(
                        send_oversized,
                        port,
                        method,
                        path,
                        total=total,
                        chunked=chunked,
                        token=token,
                    )
                    # Answered while the client was still sending, having read at most the cap.
                    assert answer.sent <= cap + IN_FLIGHT_BYTES, (label, answer)
                    if not chunked:
                        expected = {413}  # the declared length alone refuses it
                    elif not route.takes_body:
                        expected = set(range(200, 500))  # never read: answered as if empty
                    elif (
                        token is None or path.startswith("/internal/fleet/")
                    ) and route.body_limit is not BodyLimit.CREDENTIALS:
                        # The credentials come first (the replicas' routes take the fleet
                        # token, which an admin's key is not).
                        expected = {401}
                    else:
                        expected = {413}
                    assert answer.status in expected, (label, answer)
        grown = peak_rss(process.pid) - before
        assert grown <= 2 * largest, f"peak RSS grew by {grown / 2**20:.0f} MiB"
        assert (await client.get("/health")).status_code == 200


async def test_the_cap_is_the_routes_own(sqlite_url: str) -> None:
    """A body just over MAX_BODY_BYTES is fine for an import (its own, larger cap) and a 413
    elsewhere; credentials routes stop at 16 KiB; the 413 is the gateway's envelope."""
    settings = make_settings(
        DATABASE_URL=sqlite_url,
        REQUIRE_AUTH=True,
        ADMIN_API_KEY=ADMIN_KEY,
        MAX_BODY_BYTES=64 * 1024,
    )
    body = b'{"name": "' + b"a" * (80 * 1024) + b'"}'
    export = (
        b'{"version": 1, "conversation": {"title": "t"}, "messages": [{"role": "user", '
        b'"content": "' + b"a" * (80 * 1024) + b'"}]}'
    )
    auth = {"Authorization": f"Bearer {ADMIN_KEY}", "Content-Type": "application/json"}
    async with running_app(settings) as (_, client):
        keys = await client.post("/api/keys", content=body, headers=auth)
        assert keys.status_code == 413, keys.text
        assert keys.json()["error"]["code"] == "body_too_large"
        assert keys.headers["X-Error-Source"] == "gateway"
        assert str(64 * 1024) in keys.json()["error"]["message"]
        # Past the size check: the import is refused for what it is (the admin key has no
        # user), not for its size.
        imported = await client.post("/api/conversations/import", content=export, headers=auth)
        assert imported.status_code == 401, imported.text
        assert imported.json()["error"]["code"] == "user_required"
        token = b'{"refresh_token": "' + b"a" * CREDENTIALS_BODY_BYTES + b'"}'
        refresh = await client.post("/api/auth/refresh", content=token, headers=auth)
        assert refresh.status_code == 413, refresh.text


async def test_credentials_come_before_the_body(sqlite_url: str) -> None:
    """Without credentials a body route answers 401 without reading the body (a body that is
    not even JSON gets the 401, not a 400); with them, the admin limit is counted once."""
    settings: Settings = make_settings(
        DATABASE_URL=sqlite_url,
        REQUIRE_AUTH=True,
        ADMIN_API_KEY=ADMIN_KEY,
        ADMIN_RATE_LIMIT_PER_MINUTE=2,
    )
    async with running_app(settings) as (_, client):
        for path in ("/api/keys", "/api/chat", "/api/conversations/import", "/admin/api/users"):
            anonymous = await client.post(
                path, content=b"not json", headers={"Content-Type": "application/json"}
            )
            assert anonymous.status_code == 401, (path, anonymous.text)
        # Two admin calls within a limit of two: the guard's check and the route's dependency
        # are one check, not two.
        auth = {"Authorization": f"Bearer {ADMIN_KEY}"}
        for _ in range(2):
            refused = await client.post("/admin/api/users", json={}, headers=auth)
            assert refused.status_code == 400, refused.text  # past the limit: the body's turn
        third = await client.post("/admin/api/users", json={}, headers=auth)
        assert third.status_code == 429, third.text


@pytest.mark.parametrize("chunked", [False, True])
async def test_a_body_over_the_cap_on_the_proxy_is_a_413(sqlite_url: str, chunked: bool) -> None:
    settings = make_settings(DATABASE_URL=sqlite_url, MAX_BODY_BYTES=4096)
    body = b'{"model": "m", "prompt": "' + b"a" * 8192 + b'"}'

    async def stream() -> AsyncIterator[bytes]:
        for start in range(0, len(body), 1024):
            yield body[start : start + 1024]

    async with running_app(settings) as (_, client):
        response = await client.post(
            "/v1/completions",
            content=stream() if chunked else body,
            headers={"Content-Type": "application/json"},
        )
        assert response.status_code == 413, response.text
        assert response.json()["error"]["code"] == "body_too_large"


def test_a_body_is_parsed_as_orjson_would_read_it() -> None:
    """Integers wider than 64 bits become doubles (as orjson reads /v1/* bodies), so nothing the
    gateway writes again can fail; one beyond a double, or nesting past the limit, is a 400."""
    assert parse_json(b'{"a": 18446744073709551615, "b": -9223372036854775808}', max_depth=8) == {
        "a": 2**64 - 1,
        "b": -(2**63),
    }
    wide = parse_json(b'{"a": 18446744073709551616, "b": [-9223372036854775809]}', max_depth=8)
    assert wide == {"a": float(2**64), "b": [float(-(2**63) - 1)]}
    assert isinstance(wide["a"], float)
    for raw, code in (
        (b'{"a": ' + b"1" * 400 + b"}", "invalid_json"),
        (b'{"a": ' + b"1" * 5000 + b"}", "invalid_json"),
        (b'{"a": ' + b"[" * 9 + b"]" * 9 + b"}", "json_too_deep"),
        (b"[" * 5000 + b"]" * 5000, "json_too_deep"),
        (b'{"a": "\xff"}', "invalid_json"),
        (b'{"a": ', "invalid_json"),
    ):
        with pytest.raises(GatewayError) as refused:
            parse_json(raw, max_depth=8)
        assert (refused.value.status_code, refused.value.code) == (400, code), raw[:40]
