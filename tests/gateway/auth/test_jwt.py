"""RFC 8725 battery: every forged, stale or misused token is a 401 in the OpenAI envelope."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import socket
import time
import uuid
import warnings
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest
import pytest_asyncio
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from pydantic import ValidationError

from gateway.auth.tokens import check_token_keys, decode_token, issue_token
from gateway.errors import GatewayError
from gateway.settings import Settings
from tests.helpers.app import TEST_SECRET, make_settings
from tests.helpers.auth import (
    ADMIN_PASSWORD,
    USER_PASSWORD,
    assert_openai_error,
    auth_app,
    auth_settings,
    bearer,
    create_user,
    login,
)


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _segment(value: Any) -> str:
    return _b64(json.dumps(value, separators=(",", ":")).encode())


def hs_token(header: dict[str, Any], claims: dict[str, Any], secret: bytes) -> str:
    """Sign by hand (PyJWT refuses some of what an attacker would send)."""
    digest = {"HS256": hashlib.sha256, "HS384": hashlib.sha384, "HS512": hashlib.sha512}[
        header["alg"]
    ]
    signing_input = f"{_segment(header)}.{_segment(claims)}"
    signature = hmac.new(secret, signing_input.encode(), digest).digest()
    return f"{signing_input}.{_b64(signature)}"


@dataclass
class Battery:
    """One app shared by the read-only battery cases."""

    settings: Settings
    client: httpx.AsyncClient
    admin_id: str
    bob_id: str
    bob: dict[str, Any]

    def claims(self, **changes: Any) -> dict[str, Any]:
        """Bob's valid access-token claims, with changes (None removes a claim)."""
        now = int(time.time())
        valid = jwt.decode(self.bob["access_token"], options={"verify_signature": False})
        claims: dict[str, Any] = {
            **valid,
            "iat": now,
            "nbf": now,
            "exp": now + 600,
            "jti": str(uuid.uuid4()),
        }
        for name, value in changes.items():
            if value is None:
                claims.pop(name, None)
            else:
                claims[name] = value
        return claims

    def forge(self, header: dict[str, Any] | None = None, **changes: Any) -> str:
        """An HS256 token signed with the real secret (only the named defect is wrong)."""
        return hs_token(
            header or {"alg": "HS256", "typ": "JWT"}, self.claims(**changes), TEST_SECRET.encode()
        )

    async def me(self, token: str) -> httpx.Response:
        """GET /api/auth/me with this bearer token."""
        return await self.client.get("/api/auth/me", headers=bearer(token))


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def battery(module_pg_url: str) -> AsyncIterator[Battery]:
    """An app with an admin and a user `bob`, logged in."""
    settings = auth_settings(module_pg_url)
    async with auth_app(settings) as (_, client):
        admin = await login(client, "admin", ADMIN_PASSWORD)
        bob_view = await create_user(client, admin["access_token"], "bob")
        bob = await login(client, "bob", USER_PASSWORD)
        admin_me = (await client.get("/api/auth/me", headers=bearer(admin["access_token"]))).json()
        yield Battery(
            settings=settings,
            client=client,
            admin_id=admin_me["id"],
            bob_id=bob_view["id"],
            bob=bob,
        )


async def test_the_forging_helper_makes_valid_tokens(battery: Battery) -> None:
    """Control: without a defect the forged token works, so each case below tests one defect."""
    response = await battery.me(battery.forge())
    assert response.status_code == 200, response.text
    assert response.json()["username"] == "bob"
    assert (await battery.me(battery.bob["access_token"])).status_code == 200


def _alg_none(b: Battery) -> str:
    return f"{_segment({'alg': 'none', 'typ': 'JWT'})}.{_segment(b.claims())}."


def _alg_none_signed(b: Battery) -> str:
    valid = b.forge().rsplit(".", 1)[1]
    return f"{_segment({'alg': 'None'})}.{_segment(b.claims())}.{valid}"


def _other_secret(b: Battery) -> str:
    return hs_token({"alg": "HS256"}, b.claims(), b"another-secret-that-is-long-enough-000")


def _hs512_when_hs256_pinned(b: Battery) -> str:
    return hs_token({"alg": "HS512", "typ": "JWT"}, b.claims(), TEST_SECRET.encode())


def _tampered(field: str, value: Callable[[Battery], Any]) -> Callable[[Battery], str]:
    def make(b: Battery) -> str:
        header, payload, signature = b.bob["access_token"].split(".")
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        claims[field] = value(b)
        return f"{header}.{_segment(claims)}.{signature}"

    return make


def _jku_header(b: Battery) -> str:
    return b.forge({"alg": "HS256", "jku": "http://127.0.0.1:1/jwks.json"})


CASES: dict[str, Callable[[Battery], str]] = {
    "alg none": _alg_none,
    "alg None with a signature": _alg_none_signed,
    "HS256 with another secret": _other_secret,
    "HS512 while HS256 is pinned": _hs512_when_hs256_pinned,
    "expired beyond leeway": lambda b: b.forge(
        iat=int(time.time()) - 7200, exp=int(time.time()) - 61
    ),
    "nbf in the future": lambda b: b.forge(nbf=int(time.time()) + 300),
    "iat in the future": lambda b: b.forge(iat=int(time.time()) + 300, nbf=int(time.time())),
    "missing exp": lambda b: b.forge(exp=None),
    "missing sub": lambda b: b.forge(sub=None),
    "missing iat": lambda b: b.forge(iat=None),
    "missing nbf": lambda b: b.forge(nbf=None),
    "missing jti": lambda b: b.forge(jti=None),
    "missing typ": lambda b: b.forge(typ=None),
    "missing iss": lambda b: b.forge(iss=None),
    "missing aud": lambda b: b.forge(aud=None),
    "wrong iss": lambda b: b.forge(iss="someone-else"),
    "iss containing ours": lambda b: b.forge(iss=f"evil-{b.settings.JWT_ISSUER}-x"),
    "iss a prefix of ours": lambda b: b.forge(iss=b.settings.JWT_ISSUER[:-1]),
    "iss as a list": lambda b: b.forge(iss=[b.settings.JWT_ISSUER]),
    "wrong aud": lambda b: b.forge(aud="another-service"),
    "aud containing ours": lambda b: b.forge(aud=f"{b.settings.JWT_AUDIENCE}-admin"),
    "aud as a list": lambda b: b.forge(aud=[b.settings.JWT_AUDIENCE, "other"]),
    "refresh token as access token": lambda b: b.bob["refresh_token"],
    "typ refresh": lambda b: b.forge(typ="refresh"),
    "typ id": lambda b: b.forge(typ="id"),
    "other token format version": lambda b: b.forge(ver=2),
    "sub not a uuid": lambda b: b.forge(sub="bob"),
    "sub of nobody": lambda b: b.forge(sub=str(uuid.uuid4())),
    "tampered sub (admin), old signature": _tampered("sub", lambda b: b.admin_id),
    "tampered role claim, old signature": _tampered("role", lambda _: "admin"),
    "tampered exp, old signature": _tampered("exp", lambda _: int(time.time()) + 10**8),
    "signature stripped": lambda b: b.bob["access_token"].rsplit(".", 1)[0] + ".",
    "jku header": _jku_header,
    "x5u header": lambda b: b.forge({"alg": "HS256", "x5u": "http://127.0.0.1:1/cert.pem"}),
    "embedded jwk header": lambda b: b.forge({"alg": "HS256", "jwk": {"kty": "oct", "k": "AA"}}),
    "x5c header": lambda b: b.forge({"alg": "HS256", "x5c": ["MIIB"]}),
    "crit header": lambda b: b.forge({"alg": "HS256", "crit": ["exp"], "exp": 1}),
    "unknown kid": lambda b: b.forge({"alg": "HS256", "kid": "someone-elses-key"}),
    "kid not a string": lambda b: b.forge({"alg": "HS256", "kid": 7}),
    "not a JWT": lambda _: "definitely-not-a-token",
    "two segments": lambda b: ".".join(b.bob["access_token"].split(".")[:2]),
    "header not JSON": lambda b: "eyJhbGciOi." + b.bob["access_token"].split(".", 1)[1],
}


@pytest.mark.parametrize("case", list(CASES))
async def test_bad_token_is_401(battery: Battery, case: str) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", jwt.InsecureKeyLengthWarning)
        token = CASES[case](battery)
    response = await battery.me(token)
    assert_openai_error(response, 401, "invalid_token")
    assert token not in response.text


async def test_leeway_is_honoured_but_bounded(battery: Battery) -> None:
    now = int(time.time())
    within = await battery.me(battery.forge(iat=now - 3600, exp=now - 5))
    beyond = await battery.me(battery.forge(iat=now - 3600, exp=now - 61))
    assert within.status_code == 200
    assert_openai_error(beyond, 401, "invalid_token")
    assert "expired" in beyond.json()["error"]["message"]
    with pytest.raises(ValidationError):
        make_settings(JWT_LEEWAY_S=120)


async def test_access_token_is_not_a_refresh_token(battery: Battery) -> None:
    response = await battery.client.post(
        "/api/auth/refresh", json={"refresh_token": battery.bob["access_token"]}
    )
    assert_openai_error(response, 401, "invalid_token")


@pytest.fixture
def recording_listener() -> Iterator[tuple[int, Callable[[], int]]]:
    """A listening socket that never accepts: any TCP connect lands in its backlog."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    sock.setblocking(False)

    def connections() -> int:
        count = 0
        while True:
            try:
                conn, _ = sock.accept()
            except BlockingIOError:
                return count
            conn.close()
            count += 1

    try:
        yield sock.getsockname()[1], connections
    finally:
        sock.close()


async def test_key_urls_in_headers_are_never_fetched(
    battery: Battery, recording_listener: tuple[int, Callable[[], int]]
) -> None:
    port, connections = recording_listener
    url = f"http://127.0.0.1:{port}/.well-known/jwks.json"
    for name in ("jku", "x5u"):
        token = battery.forge({"alg": "HS256", name: url})
        assert_openai_error(await battery.me(token), 401, "invalid_token")
    # Also with an otherwise valid kid: the URL alone is enough to refuse.
    valid_kid = jwt.get_unverified_header(battery.bob["access_token"])["kid"]
    token = battery.forge({"alg": "HS256", "kid": valid_kid, "jku": url})
    assert_openai_error(await battery.me(token), 401, "invalid_token")
    assert connections() == 0


async def test_our_tokens_carry_every_required_claim(battery: Battery) -> None:
    header = jwt.get_unverified_header(battery.bob["access_token"])
    claims = jwt.decode(battery.bob["access_token"], options={"verify_signature": False})
    assert header["alg"] == "HS256"
    assert "kid" in header
    assert {"iss", "aud", "sub", "iat", "nbf", "exp", "jti", "typ", "ver"} <= set(claims)
    assert claims["typ"] == "access"
    assert claims["sub"] == battery.bob_id
    assert "role" not in claims  # roles are read from the database on every request
    refresh = jwt.decode(battery.bob["refresh_token"], options={"verify_signature": False})
    assert refresh["typ"] == "refresh"
    assert refresh["jti"] != claims["jti"]


def test_short_or_placeholder_secret_refuses_to_start() -> None:
    with pytest.raises(ValidationError, match="shorter than 32 bytes"):
        make_settings(JWT_SECRET="x" * 31)
    with pytest.raises(ValidationError, match="placeholder"):
        make_settings(JWT_SECRET="change-me-change-me-change-me-change-me-1234")
    with pytest.raises(ValidationError):
        make_settings(JWT_SECRET=None)
    with pytest.raises(ValidationError):
        make_settings(JWT_ALGORITHM="none")
    # HS512 needs a 64-byte key; the 43-byte test secret is refused when keys are loaded.
    with pytest.raises(ValueError, match="too weak"):
        check_token_keys(make_settings(JWT_ALGORITHM="HS512"))


def _rsa_pem_pair(tmp_path: Path, name: str, bits: int = 2048) -> tuple[Path, Path, bytes]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    private = tmp_path / f"{name}.key"
    public = tmp_path / f"{name}.pub"
    private.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    public_pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    public.write_bytes(public_pem)
    return private, public, public_pem


async def test_rs256_pinned_refuses_hs256_signed_with_the_public_key(
    pg_url: str, tmp_path: Path
) -> None:
    private, public, public_pem = _rsa_pem_pair(tmp_path, "gateway")
    other_private, _, _ = _rsa_pem_pair(tmp_path, "attacker")
    settings = auth_settings(
        pg_url,
        JWT_ALGORITHM="RS256",
        JWT_SECRET=None,
        JWT_PRIVATE_KEY_FILE=str(private),
        JWT_PUBLIC_KEY_FILE=str(public),
    )
    async with auth_app(settings) as (_, client):
        admin = await login(client, "admin", ADMIN_PASSWORD)
        assert jwt.get_unverified_header(admin["access_token"])["alg"] == "RS256"
        valid = await client.get("/api/auth/me", headers=bearer(admin["access_token"]))
        claims = jwt.decode(admin["access_token"], options={"verify_signature": False})
        claims["jti"] = str(uuid.uuid4())
        confused = [
            hs_token({"alg": alg, "typ": "JWT"}, claims, public_pem)
            for alg in ("HS256", "HS384", "HS512")
        ]
        other_key = jwt.encode(
            claims, other_private.read_bytes(), algorithm="RS256", headers={"kid": "x"}
        )
        other_key_no_kid = jwt.encode(claims, other_private.read_bytes(), algorithm="RS256")
        rs512 = jwt.encode(claims, private.read_bytes(), algorithm="RS512")
        responses = [
            await client.get("/api/auth/me", headers=bearer(token))
            for token in (*confused, other_key, other_key_no_kid, rs512)
        ]
    assert valid.status_code == 200, valid.text
    for response in responses:
        assert_openai_error(response, 401, "invalid_token")


def test_mismatched_or_weak_key_files_refuse_to_start(tmp_path: Path) -> None:
    private, public, _ = _rsa_pem_pair(tmp_path, "a")
    other_private, _, _ = _rsa_pem_pair(tmp_path, "b")
    weak_private, weak_public, _ = _rsa_pem_pair(tmp_path, "weak", bits=1024)
    with pytest.raises(ValueError, match="does not belong"):
        check_token_keys(
            make_settings(
                JWT_ALGORITHM="RS256",
                JWT_PRIVATE_KEY_FILE=str(other_private),
                JWT_PUBLIC_KEY_FILE=str(public),
            )
        )
    with pytest.raises(ValueError, match="too weak"):
        check_token_keys(
            make_settings(
                JWT_ALGORITHM="RS256",
                JWT_PRIVATE_KEY_FILE=str(weak_private),
                JWT_PUBLIC_KEY_FILE=str(weak_public),
            )
        )
    with pytest.raises(ValueError, match="does not hold a key for ES256"):
        check_token_keys(make_settings(JWT_ALGORITHM="ES256", JWT_PUBLIC_KEY_FILE=str(public)))
    # Verify-only deployments (no private key) verify but cannot issue.
    verify_only = make_settings(JWT_ALGORITHM="RS256", JWT_PUBLIC_KEY_FILE=str(public))
    check_token_keys(verify_only)
    with pytest.raises(GatewayError) as refused:
        issue_token(verify_only, user_id=uuid.uuid4(), kind="access", family_id=uuid.uuid4())
    assert refused.value.status_code == 503
    signer = make_settings(
        JWT_ALGORITHM="RS256", JWT_PRIVATE_KEY_FILE=str(private), JWT_PUBLIC_KEY_FILE=str(public)
    )
    issued = issue_token(signer, user_id=uuid.uuid4(), kind="access", family_id=uuid.uuid4())
    assert decode_token(verify_only, issued.token, expected_type="access").jti == issued.jti
