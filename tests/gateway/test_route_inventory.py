"""Route inventory: every route is classified public, user or admin, and behaves accordingly.

SECURITY.md, "Route inventory" and "Secrets never logged". Peers shipped routes that were open
by accident (vLLM's `--api-key` left some routes open; GPUStack's worker debug routes) and an
auth check that read the path from a URL rebuilt with the Host header (vLLM GHSA-94f4-hr76-p5j6).
So:

1. every route of the app (all methods) is on exactly one of PUBLIC / USER / ADMIN / METRICS; a new
   route on none of them fails `test_every_route_is_classified` until someone decides;
2. every non-public route answers 401 (OpenAI envelope, `WWW-Authenticate: Bearer`) without
   credentials; every admin route answers 403 to a normal user's JWT and API key;
3. path variants sent raw over a socket (`//v1/models`, `%2e%2e`, upper case, ...) and spoofed
   Host / X-Forwarded-Host / X-Original-URL / X-Rewrite-URL headers never get past auth;
4. the admin used here really is admin (its calls succeed), so the 403s mean something;
5. no response (outside the ones that issue them) and no log line carries a password, a JWT, an
   API key, the admin key, the JWT secret, an argon2 hash or a key digest.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from fastapi import FastAPI
from sqlalchemy import select

from gateway.app import create_app
from gateway.db import create_engine, create_session_factory
from gateway.keys.models import ApiKey
from gateway.keys.service import KEY_CACHE
from gateway.settings import Settings
from gateway.users.models import User
from tests.helpers.app import TEST_SECRET, running_app, served_app
from tests.helpers.auth import (
    ADMIN_PASSWORD,
    USER_PASSWORD,
    auth_settings,
    bearer,
)
from tests.helpers.routes import Key, concrete, inventory

# The break-glass admin key is switched on here so that it is covered too (its 403/401 paths
# and that it never leaks).
ADMIN_API_KEY = "sk-admin-inventory-Zq4Lm8Rt2Wx6Yb0Nc3Vd7"
# /metrics has its own credential; set here so the route is guarded like the others.
METRICS_TOKEN = "metrics-inventory-Hc5Pw9Kt3Ry7"

# ---------------------------------------------------------------------------------------------
# The classification. Each entry says why; a route moves between lists only deliberately.
# ---------------------------------------------------------------------------------------------

PUBLIC: dict[Key, str] = {
    # Service name, version, environment and links; no user data, no secrets.
    ("GET", "/"): "root document for humans and probes",
    # Liveness and readiness are polled by orchestrators and load balancers without credentials;
    # they report only up/down per dependency.
    ("GET", "/health"): "liveness probe",
    ("GET", "/health/ready"): "readiness probe",
    # The API description: the same for everyone, nothing per user. Starlette adds HEAD to GET.
    ("GET", "/openapi.json"): "API description",
    ("HEAD", "/openapi.json"): "API description",
    ("GET", "/docs"): "Swagger UI page (static)",
    ("GET", "/docs/oauth2-redirect"): "Swagger UI OAuth2 redirect page (static)",
    ("GET", "/redoc"): "ReDoc page (static)",
    ("GET", "/docs/assets/{file}"): "Swagger UI / ReDoc scripts, style and icon (vendored)",
    # Credentials travel in the body: these are how a caller gets a token in the first place.
    # Rate limited per IP; without valid credentials they answer 4xx (checked below).
    ("POST", "/api/auth/login"): "username + password in the body",
    ("POST", "/admin/api/login"): "username + password in the body (admins only)",
    ("POST", "/api/auth/refresh"): "the refresh token in the body is the credential",
    ("POST", "/api/auth/logout"): "a refresh or access token is the credential; none: 400",
    # The browser pages and their scripts/styles: static shells with no data in them; what they
    # show comes from the API with the signed-in user's token (tests/gateway/ui).
    ("GET", "/chat"): "chat page (static shell)",
    ("GET", "/chat-streaming"): "seed 000's address of the chat page (static shell)",
    ("GET", "/test"): "seed 000's request tester (static shell; what it sends carries its own "
    "credentials)",
    ("GET", "/dashboard"): "admin console page (static shell; its data needs the admin role)",
    ("GET", "/admin"): "redirect to /dashboard (seed 002's admin address)",
    ("GET", "/ui/static/{asset}"): "scripts, styles and icon of the pages",
}

# Public routes that answer with a redirect to another public route.
REDIRECTS = {("GET", "/admin"): "/dashboard"}

# Public routes that need a credential in the body: without one they must not succeed.
CREDENTIAL_IN_BODY = {
    ("POST", "/api/auth/login"),
    ("POST", "/admin/api/login"),
    ("POST", "/api/auth/refresh"),
    ("POST", "/api/auth/logout"),
}

# Any authenticated caller (JWT, API key or the admin key).
USER: dict[Key, str] = {
    ("GET", "/api/auth/me"): "own account",
    ("PATCH", "/api/auth/me"): "own account",
    ("POST", "/api/keys"): "own keys",
    ("GET", "/api/keys"): "own keys",
    ("DELETE", "/api/keys/{key_id}"): "own keys",
    ("GET", "/api/usage"): "own usage",
    ("POST", "/v1/chat/completions"): "inference",
    ("POST", "/v1/completions"): "inference",
    ("POST", "/v1/embeddings"): "inference",
    ("GET", "/v1/models"): "model list",
    # Seed 004's paths for the same routes.
    ("POST", "/api/v1/chat/completions"): "inference",
    ("POST", "/api/v1/completions"): "inference",
    ("POST", "/api/v1/embeddings"): "inference",
    ("GET", "/models"): "model list",
    ("POST", "/v1/responses"): "inference",
    ("GET", "/v1/responses/{response_id}"): "stored responses (none: 404)",
    ("DELETE", "/v1/responses/{response_id}"): "stored responses (none: 404)",
    ("POST", "/v1/responses/{response_id}/cancel"): "stored responses (none: 404)",
    ("GET", "/v1/responses/{response_id}/input_items"): "stored responses (none: 404)",
    ("POST", "/v1/messages"): "inference (Anthropic's API)",
    ("POST", "/v1/messages/count_tokens"): "inference (Anthropic's API)",
    ("POST", "/v1/rerank"): "inference",
    ("POST", "/v1/score"): "inference",
    ("POST", "/tokenize"): "the model's tokenizer",
    ("POST", "/detokenize"): "the model's tokenizer",
    ("POST", "/v1/audio/transcriptions"): "inference",
    ("GET", "/lb/status"): "queue state",
    # Conversations belong to a user: the admin key (no user) gets 401 user_required.
    ("GET", "/api/conversations"): "own conversations",
    ("POST", "/api/conversations"): "own conversations",
    ("POST", "/api/conversations/import"): "own conversations",
    ("GET", "/api/conversations/{conversation_id:uuid}"): "own conversation (404 for others')",
    ("PATCH", "/api/conversations/{conversation_id:uuid}"): "own conversation (404 for others')",
    ("DELETE", "/api/conversations/{conversation_id:uuid}"): "own conversation (404 for others')",
    (
        "GET",
        "/api/conversations/{conversation_id:uuid}/export",
    ): "own conversation (404 for others')",
    ("POST", "/api/chat"): "chat in own conversations (inference)",
    ("POST", "/api/chat/completions"): "the same, at the OpenAI SDK's path",
}

# Admin role only: /api/models/*, /models/{model_name}/load, /api/gpus and /admin/* except
# /admin/api/login.
ADMIN: dict[Key, str] = {
    ("GET", "/api/models/status"): "model management",
    ("GET", "/api/models/profiles"): "model management",
    ("POST", "/api/models/switch"): "model management",
    ("GET", "/api/models/switch/{job_id}"): "model management",
    ("GET", "/api/models/jobs"): "model management",
    ("GET", "/api/models/jobs/{job_id}"): "model management",
    ("GET", "/api/models/engines"): "model management",
    ("POST", "/api/models/{profile_id}/load"): "model management",
    ("POST", "/models/{model_name}/load"): "model management (seed 004's path)",
    ("POST", "/api/models/{profile_id}/unload"): "model management",
    ("POST", "/api/models/{profile_id}/sleep"): "model management",
    ("POST", "/api/models/{profile_id}/wake"): "model management",
    ("GET", "/api/models/events"): "model management",
    ("GET", "/api/models/hardware-recommendations"): "model management",
    ("POST", "/api/models/reload"): "model management",
    ("GET", "/api/gpus"): "hardware inventory",
    ("POST", "/admin/api/users"): "user management",
    ("GET", "/admin/api/users"): "user management",
    ("GET", "/admin/api/users/{user_id}"): "user management",
    ("PATCH", "/admin/api/users/{user_id}"): "user management",
    ("POST", "/admin/api/keys"): "key management",
    ("GET", "/admin/api/keys"): "key management",
    ("PUT", "/admin/api/keys/{key_id}"): "key management",
    ("DELETE", "/admin/api/keys/{key_id}"): "key management",
    ("GET", "/admin/api/usage"): "everyone's usage",
}

# Prometheus only: METRICS_TOKEN as the bearer token (no user, key or admin credential works;
# without a token configured, loopback peers only). 401 without it, like the routes above.
METRICS: dict[Key, str] = {
    ("GET", "/metrics"): "Prometheus scrape (METRICS_TOKEN)",
}

# Gateway replicas run fleet operations on the leader here; the credential is the fleet token
# every replica derives from the shared JWT secret (X-Fleet-Token), never a user's: 401 without
# it, like every other non-public route (tests/gateway/replicas/ test what it may do).
REPLICA: dict[Key, str] = {
    ("POST", "/internal/fleet/jobs"): "a follower's fleet operation, run on the leader",
    ("GET", "/internal/fleet/jobs/{job_id}"): "its outcome",
}

_ADMIN_PREFIXES = ("/api/models/", "/admin/")
_ADMIN_PATHS = {"/api/gpus", "/models/{model_name}/load"}

WRITE_METHODS = {"POST", "PUT", "PATCH", "DELETE"}
ALL_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")

_JWT_SHAPE = re.compile(r"eyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}")


def _is_admin_path(path: str) -> bool:
    if path == "/admin/api/login":
        return False
    return path in _ADMIN_PATHS or path.startswith(_ADMIN_PREFIXES)


# ---------------------------------------------------------------------------------------------
# Everything the tests saw, and the secrets none of it may contain
# ---------------------------------------------------------------------------------------------


@dataclass
class Seen:
    """Every response (status line, headers, body) of one test."""

    texts: list[tuple[str, str, bool]] = field(default_factory=list)

    def add(self, label: str, text: str, *, issues_credentials: bool = False) -> None:
        """Record a response; `issues_credentials` marks login/refresh/key creation."""
        self.texts.append((label, text, issues_credentials))

    async def record(self, response: httpx.Response) -> None:
        """httpx response hook."""
        await response.aread()
        request = response.request
        headers = "\n".join(f"{k}: {v}" for k, v in response.headers.items())
        issues = request.method == "POST" and request.url.path in {
            "/api/auth/login",
            "/admin/api/login",
            "/api/auth/refresh",
            "/api/keys",
            "/admin/api/keys",
        }
        self.add(
            f"{request.method} {request.url} -> {response.status_code}",
            f"{headers}\n{response.text}",
            issues_credentials=issues and response.is_success,
        )


@dataclass
class Secrets:
    """Values that must never appear where they do not belong."""

    passwords: set[str] = field(default_factory=lambda: {ADMIN_PASSWORD, USER_PASSWORD})
    tokens: set[str] = field(default_factory=set)  # JWTs and API keys handed out
    fixed: set[str] = field(default_factory=lambda: {ADMIN_API_KEY, TEST_SECRET, METRICS_TOKEN})
    stored: set[str] = field(default_factory=set)  # argon2 hashes, key digests

    def never_anywhere(self) -> set[str]:
        """Not in any response, not in any log line."""
        pieces = set(self.passwords) | set(self.fixed)
        for stored in self.stored:
            pieces.add(stored)
            if stored.startswith("$argon2"):
                # Salt and digest separately: catches a partly printed hash.
                pieces.update(stored.rsplit("$", 2)[-2:])
        return pieces


async def load_stored(url: str, secrets: Secrets) -> None:
    """Add every password hash and API key digest in the database."""
    engine = create_engine(url, pool_size=1)
    try:
        async with create_session_factory(engine)() as session:
            secrets.stored.update(
                h for h in await session.scalars(select(User.password_hash)) if h is not None
            )
            secrets.stored.update(await session.scalars(select(ApiKey.digest)))
    finally:
        await engine.dispose()


def assert_no_secrets(seen: Seen, secrets: Secrets, logs: str) -> None:
    """Part 5: responses and logs are clean."""
    assert seen.texts, "nothing was recorded"
    assert secrets.tokens, "no credentials were issued: the check would be empty"
    anywhere = secrets.never_anywhere()
    for label, text, issues_credentials in seen.texts:
        assert "argon2" not in text.lower(), label
        for secret in anywhere:
            assert secret not in text, f"{label}: leaks a secret\n{text}"
        if issues_credentials:
            continue
        for token in secrets.tokens:
            assert token not in text, f"{label}: echoes a credential\n{text}"
        assert not _JWT_SHAPE.search(text), f"{label}: contains a JWT\n{text}"
    # The access log's lines are there: the capture works, so the check below means something.
    assert '"event":"request"' in logs.replace('": "', '":"'), "no request logs were captured"
    assert "argon2" not in logs.lower()
    for secret in anywhere | secrets.tokens:
        assert secret not in logs, "a secret reached the logs"
    assert not _JWT_SHAPE.search(logs), "a JWT reached the logs"


# ---------------------------------------------------------------------------------------------
# The identities: admin (password login), a normal user (JWT and API key), the admin key
# ---------------------------------------------------------------------------------------------


@dataclass
class Identities:
    admin_jwt: str
    user_jwt: str
    user_key: str
    user_id: str


def settings_for(sqlite_url: str) -> Settings:
    return auth_settings(sqlite_url, ADMIN_API_KEY=ADMIN_API_KEY, METRICS_TOKEN=METRICS_TOKEN)


async def _login(client: httpx.AsyncClient, path: str, username: str, password: str) -> str:
    response = await client.post(path, json={"username": username, "password": password})
    assert response.status_code == 200, response.text
    return str(response.json()["access_token"])


async def make_identities(client: httpx.AsyncClient, secrets: Secrets) -> Identities:
    """Log in as the bootstrap admin, create a normal user, log in as it, give it a key."""
    admin_jwt = await _login(client, "/admin/api/login", "admin", ADMIN_PASSWORD)
    created = await client.post(
        "/admin/api/users",
        json={"username": "alice", "password": USER_PASSWORD},
        headers=bearer(admin_jwt),
    )
    assert created.status_code == 201, created.text
    assert created.json()["role"] == "user"
    user_jwt = await _login(client, "/api/auth/login", "alice", USER_PASSWORD)
    key = await client.post(
        "/api/keys", json={"description": "inventory"}, headers=bearer(user_jwt)
    )
    assert key.status_code == 201, key.text
    user_key = str(key.json()["key"])
    secrets.tokens.update({admin_jwt, user_jwt, user_key})
    return Identities(
        admin_jwt=admin_jwt, user_jwt=user_jwt, user_key=user_key, user_id=created.json()["id"]
    )


@pytest.fixture(autouse=True)
def _fresh_key_cache() -> Iterator[None]:
    # Process-wide: lookups from another test's database must not answer here.
    KEY_CACHE.clear()
    yield
    KEY_CACHE.clear()


@asynccontextmanager
async def asgi_gateway(
    sqlite_url: str, seen: Seen
) -> AsyncIterator[tuple[FastAPI, httpx.AsyncClient]]:
    async with running_app(settings_for(sqlite_url)) as (app, client):
        client.event_hooks["response"].append(seen.record)
        yield app, client


# ---------------------------------------------------------------------------------------------
# Raw HTTP over a socket: the path and headers exactly as written, nothing normalised
# ---------------------------------------------------------------------------------------------


@dataclass
class RawResponse:
    status: int
    headers: dict[str, str]
    body: bytes


async def raw_request(
    port: int,
    target: str,
    *,
    method: str = "GET",
    host: str | None = None,
    headers: dict[str, str] | None = None,
    seen: Seen | None = None,
) -> RawResponse:
    """Send `METHOD target HTTP/1.1` with exactly these headers; read until the server closes."""
    lines = [f"{method} {target} HTTP/1.1", f"Host: {host or f'127.0.0.1:{port}'}"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    lines += ["Connection: close", "Content-Length: 0", "", ""]
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write("\r\n".join(lines).encode("latin-1"))
        await writer.drain()
        data = await asyncio.wait_for(reader.read(), timeout=15)
    finally:
        writer.close()
        await writer.wait_closed()
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    parsed = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        parsed[name.strip().lower()] = value.strip()
    response = RawResponse(status=int(status_line.split(" ")[1]), headers=parsed, body=body)
    if seen is not None:
        seen.add(
            f"raw {method} {target} (Host {host}) -> {response.status}",
            data.decode("latin-1"),
        )
    return response


# ---------------------------------------------------------------------------------------------
# Assertions on responses
# ---------------------------------------------------------------------------------------------


def assert_401(response: httpx.Response, label: str) -> None:
    assert response.status_code == 401, f"{label}: {response.status_code} {response.text}"
    body = response.json()
    error = body["error"]
    if " /v1/messages" in label:  # Anthropic's routes answer in Anthropic's envelope
        assert body["type"] == "error", label
        assert set(error) == {"message", "type"}, label
    else:
        assert set(error) == {"message", "type", "param", "code"}, label
    assert error["type"] == "authentication_error", label
    assert response.headers["www-authenticate"].startswith("Bearer"), label


def assert_403(response: httpx.Response, label: str) -> None:
    assert response.status_code == 403, f"{label}: {response.status_code} {response.text}"
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}, label
    assert error["type"] == "permission_error", label
    assert error["code"] == "admin_required", label


async def call(
    client: httpx.AsyncClient, method: str, path: str, headers: dict[str, str] | None = None
) -> httpx.Response:
    body: dict[str, Any] = {"json": {}} if method in WRITE_METHODS else {}
    return await client.request(method, concrete(path), headers=headers, **body)


# ---------------------------------------------------------------------------------------------
# 1. Inventory, 401 without credentials, 403 for a normal user
# ---------------------------------------------------------------------------------------------


def test_lists_are_consistent() -> None:
    assert not PUBLIC.keys() & USER.keys()
    assert not PUBLIC.keys() & ADMIN.keys()
    assert not USER.keys() & ADMIN.keys()
    assert not METRICS.keys() & (PUBLIC.keys() | USER.keys() | ADMIN.keys())
    assert not REPLICA.keys() & (PUBLIC.keys() | USER.keys() | ADMIN.keys() | METRICS.keys())
    assert PUBLIC.keys() >= CREDENTIAL_IN_BODY
    for method, path in ADMIN:
        assert _is_admin_path(path), f"{method} {path} is not under an admin prefix"
    for method, path in PUBLIC.keys() | USER.keys():
        assert not _is_admin_path(path), f"{method} {path} is under an admin prefix"


def test_every_route_is_classified(tmp_path: Any) -> None:
    app = create_app(settings_for(f"sqlite+aiosqlite:///{tmp_path / 'unused.db'}"))
    routes = inventory(app)
    classified = PUBLIC.keys() | USER.keys() | ADMIN.keys() | METRICS.keys() | REPLICA.keys()
    new = sorted(routes - classified)
    gone = sorted(classified - routes)
    assert not new, (
        "Routes on no list in tests/gateway/test_route_inventory.py. Classify each one as "
        f"PUBLIC (say why), USER, ADMIN, METRICS or REPLICA: {new}"
    )
    assert not gone, f"Listed routes the app no longer has; remove them: {gone}"


async def test_anonymous_gets_401_on_every_non_public_route(
    sqlite_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    seen, secrets = Seen(), Secrets()
    async with asgi_gateway(sqlite_url, seen) as (app, client):
        await make_identities(client, secrets)
        routes = inventory(app)
        for method, path in sorted(routes - PUBLIC.keys()):
            label = f"{method} {path}"
            assert_401(await call(client, method, path), label)
            # A credential that is not ours, another scheme, a credential in the query string.
            assert_401(await call(client, method, path, bearer("not-a-real-credential")), label)
            assert_401(await call(client, method, path, {"Authorization": "Basic YTpi"}), label)
            leaked = await client.request(
                method, concrete(path) + f"?api_key={ADMIN_API_KEY}&access_token={ADMIN_API_KEY}"
            )
            assert_401(leaked, f"{label} (credential in the query string)")
        for method, path in sorted(PUBLIC):
            response = await call(client, method, path)
            label = f"{method} {path} -> {response.status_code}"
            assert response.status_code < 500 or path == "/health/ready", label
            if (method, path) in CREDENTIAL_IN_BODY:
                assert 400 <= response.status_code < 500, label
            elif (method, path) in REDIRECTS:
                assert response.status_code in {307, 308}, label
                assert response.headers["location"] == REDIRECTS[(method, path)], label
            else:
                assert response.status_code in {200, 503}, label
        # Methods a path does not declare: 405 (or 401), never a success.
        by_path: dict[str, set[str]] = {}
        for method, path in routes:
            by_path.setdefault(path, set()).add(method)
        for path, methods in sorted(by_path.items()):
            for method in ALL_METHODS:
                if method in methods:
                    continue
                response = await call(client, method, path)
                assert response.status_code in {401, 405}, (
                    f"{method} {path}: {response.status_code} {response.text}"
                )
    await load_stored(sqlite_url, secrets)
    captured = capsys.readouterr()
    assert_no_secrets(seen, secrets, captured.err + captured.out)


async def test_normal_user_gets_403_on_every_admin_route(
    sqlite_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    seen, secrets = Seen(), Secrets()
    async with asgi_gateway(sqlite_url, seen) as (app, client):
        ids = await make_identities(client, secrets)
        # The user really is authenticated: its own routes answer.
        for path in ("/api/auth/me", "/api/keys", "/api/usage", "/v1/models", "/lb/status"):
            for credential in (ids.user_jwt, ids.user_key):
                response = await client.get(path, headers=bearer(credential))
                assert response.status_code == 200, f"{path}: {response.text}"
        me = await client.get("/api/auth/me", headers=bearer(ids.user_key))
        assert me.json()["role"] == "user"
        admin_routes = inventory(app) & ADMIN.keys()
        assert admin_routes == ADMIN.keys()
        for method, path in sorted(admin_routes):
            for via, credential in (("jwt", ids.user_jwt), ("api key", ids.user_key)):
                response = await call(client, method, path, bearer(credential))
                assert_403(response, f"{method} {path} as a user ({via})")
        # Nothing changed: alice is still a user and the only keys are hers.
        users = await client.get("/admin/api/users", headers=bearer(ids.admin_jwt))
        assert {u["username"]: u["role"] for u in users.json()["data"]} == {
            "admin": "admin",
            "alice": "user",
        }
    await load_stored(sqlite_url, secrets)
    captured = capsys.readouterr()
    assert_no_secrets(seen, secrets, captured.err + captured.out)


# ---------------------------------------------------------------------------------------------
# 4. The admin is admin: the 403s above mean something
# ---------------------------------------------------------------------------------------------

ADMIN_READS = (
    "/api/models/status",
    "/api/models/profiles",
    "/api/models/engines",
    "/api/models/jobs",
    "/api/models/hardware-recommendations",
    "/api/gpus",
    "/admin/api/users",
    "/admin/api/keys",
    "/admin/api/usage",
)


async def test_admin_credentials_work_and_stored_secrets_are_not_credentials(
    sqlite_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    seen, secrets = Seen(), Secrets()
    async with asgi_gateway(sqlite_url, seen) as (_, client):
        ids = await make_identities(client, secrets)
        for path in ADMIN_READS:
            for via, credential in (("jwt", ids.admin_jwt), ("admin key", ADMIN_API_KEY)):
                response = await client.get(path, headers=bearer(credential))
                assert response.status_code == 200, f"{path} as admin ({via}): {response.text}"
        # No account credential scrapes metrics: only METRICS_TOKEN does.
        for credential in (ids.admin_jwt, ADMIN_API_KEY, ids.user_jwt, ids.user_key):
            assert_401(await client.get("/metrics", headers=bearer(credential)), "/metrics")
        scraped = await client.get("/metrics", headers=bearer(METRICS_TOKEN))
        assert scraped.status_code == 200, scraped.text
        one = await client.get(f"/admin/api/users/{ids.user_id}", headers=bearer(ids.admin_jwt))
        assert one.status_code == 200, one.text
        assert one.json()["username"] == "alice"
        # An admin write: give alice a key; alice's key list shows it.
        key = await client.post(
            "/admin/api/keys", json={"user_id": "alice"}, headers=bearer(ADMIN_API_KEY)
        )
        assert key.status_code == 201, key.text
        secrets.tokens.add(key.json()["key"])
        mine = await client.get("/api/keys", headers=bearer(ids.user_jwt))
        assert key.json()["id"] in {k["id"] for k in mine.json()["data"]}
        # Stored values and passwords are not credentials (pass-the-hash, digest-as-key).
        await load_stored(sqlite_url, secrets)
        for stored in [*sorted(secrets.stored), ADMIN_PASSWORD, TEST_SECRET]:
            for path in ("/v1/models", "/api/models/status"):
                response = await client.get(path, headers=bearer(stored))
                assert response.status_code == 401, f"{path}: {response.text}"
    await load_stored(sqlite_url, secrets)
    captured = capsys.readouterr()
    assert_no_secrets(seen, secrets, captured.err + captured.out)


# ---------------------------------------------------------------------------------------------
# 2 and 3. Raw path variants and spoofed Host headers on a real server
# ---------------------------------------------------------------------------------------------

USER_TARGET = "/v1/models"
ADMIN_TARGET = "/api/models/status"

PATH_VARIANTS = (
    "//v1/models",
    "/v1/models/",
    "/v1//models",
    "/v1/./models",
    "/v1/models/.",
    "/%2e%2e/v1/models",
    "/v1/%2e%2e/v1/models",
    "/health/../v1/models",
    "/health/%2e%2e/v1/models",
    "/v1/models%2f",
    "/v1/models;x",
    "/v1/models%00",
    "/V1/MODELS",
    "/v1/Models",
    "/api/models/status/",
    "//api/models/status",
    "/api//models/status",
    "/api/models/../models/status",
    "/api/models/%2e%2e/models/status",
    "/health/../api/models/status",
    "/API/MODELS/STATUS",
    "/Api/Models/Status",
    "/admin/api/users/",
    "//admin/api/users",
    "/ADMIN/API/USERS",
    "/admin/api/login/../users",
    # Percent-encoded letters decode to the real route: still 401.
    "/%76%31/models",
    "/v1%2fmodels",
    # Absolute-form request targets (RFC 9112 3.2.2).
    "http://127.0.0.1/v1/models",
    "http://127.0.0.1/health/../v1/models",
)

SPOOFED: tuple[tuple[str | None, dict[str, str]], ...] = (
    ("127.0.0.1/health?x=", {}),
    ("localhost:8080/health#", {}),
    ("localhost/health?", {}),
    ("evil.example", {}),
    (None, {"X-Forwarded-Host": "127.0.0.1/health?x="}),
    (None, {"X-Forwarded-Host": "localhost/health#", "X-Forwarded-Proto": "https"}),
    (None, {"Forwarded": 'host="127.0.0.1/health?x="'}),
    (None, {"X-Original-URL": "/health"}),
    (None, {"X-Rewrite-URL": "/health"}),
    (None, {"X-Forwarded-Prefix": "/health"}),
    (None, {"X-Forwarded-Path": "/health"}),
    (None, {"X-Forwarded-For": "127.0.0.1", "X-Real-IP": "127.0.0.1"}),
    (
        "127.0.0.1/health?x=",
        {
            "X-Forwarded-Host": "127.0.0.1/health?x=",
            "X-Original-URL": "/health",
            "X-Rewrite-URL": "/health",
        },
    ),
)


CANONICAL = {USER_TARGET, ADMIN_TARGET, "/admin/api/users"}


def check_variant(response: RawResponse, label: str) -> None:
    """401/404/405; a trailing-slash redirect only to the canonical path, with no body."""
    if response.status in {307, 308}:
        # Starlette's redirect_slashes: nothing is served, the client is sent to the route
        # itself, which asks for credentials (checked by the caller).
        location = urlsplit(response.headers["location"])
        assert location.path in CANONICAL, f"{label}: {response}"
        assert not response.body, label
        return
    assert response.status in {401, 404, 405}, f"{label}: {response.status} {response.body!r}"


async def test_raw_path_variants_and_spoofed_hosts_do_not_bypass_auth(
    sqlite_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    seen, secrets = Seen(), Secrets()
    async with served_app(settings_for(sqlite_url)) as (_, base):
        port = int(base.rsplit(":", 1)[1])
        async with httpx.AsyncClient(base_url=base, trust_env=False) as client:
            client.event_hooks["response"].append(seen.record)
            ids = await make_identities(client, secrets)

        # Sanity: the raw client reaches the routes; credentials work through it.
        ok = await raw_request(port, USER_TARGET, headers=bearer(ids.user_jwt), seen=seen)
        assert ok.status == 200, ok
        ok = await raw_request(port, ADMIN_TARGET, headers=bearer(ids.admin_jwt), seen=seen)
        assert ok.status == 200, ok
        for target in (USER_TARGET, ADMIN_TARGET):
            response = await raw_request(port, target, seen=seen)
            assert response.status == 401, response
            assert response.headers["www-authenticate"].startswith("Bearer")

        # 2. Path variants, raw: without credentials never served.
        for target in PATH_VARIANTS:
            for method in ("GET", "POST"):
                response = await raw_request(port, target, method=method, seen=seen)
                check_variant(response, f"{target} {method} anonymous")
                if response.status in {307, 308}:
                    follow = await raw_request(
                        port, urlsplit(response.headers["location"]).path, seen=seen
                    )
                    assert follow.status == 401, f"{target} redirect target: {follow}"
            # A normal user does not reach admin routes through a variant either.
            if "/v1" not in target.lower() and "%76" not in target:
                for credential in (ids.user_jwt, ids.user_key):
                    response = await raw_request(
                        port, target, headers=bearer(credential), seen=seen
                    )
                    assert response.status != 200, f"{target} as a user: {response}"
                    check_variant(response, f"{target} as user")
                    assert response.status in {307, 308, 403, 404, 405}, (target, response)

        # 3. Spoofed Host and rewrite headers: the path the server routes on is what counts.
        for target in (USER_TARGET, ADMIN_TARGET):
            for host, headers in SPOOFED:
                label = f"{target} Host={host!r} {headers}"
                response = await raw_request(port, target, host=host, headers=headers, seen=seen)
                assert response.status == 401, f"{label}: {response}"
                assert response.headers["www-authenticate"].startswith("Bearer"), label
                as_user = await raw_request(
                    port, target, host=host, headers={**headers, **bearer(ids.user_key)}, seen=seen
                )
                expected = 200 if target == USER_TARGET else 403
                assert as_user.status == expected, f"{label} as a user: {as_user}"
        # The rewrite headers do not turn a public route into something else either.
        plain = await raw_request(port, "/health", seen=seen)
        for name in ("X-Original-URL", "X-Rewrite-URL"):
            health = await raw_request(port, "/health", headers={name: ADMIN_TARGET}, seen=seen)
            assert health.status == 200, health
            assert json.loads(health.body).keys() == json.loads(plain.body).keys()
    await load_stored(sqlite_url, secrets)
    captured = capsys.readouterr()
    assert_no_secrets(seen, secrets, captured.err + captured.out)
