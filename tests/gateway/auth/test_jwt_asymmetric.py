"""EdDSA and ES256 token signing end to end: keys made with `cryptography`, a login, the token
on /api/auth/me and through a refresh; a token signed with another key of the same kind is 401.

(RS256 end to end is in test_jwt.py.)
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519

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

pytestmark = pytest.mark.postgres

KeyMaker = Callable[[], Any]
KINDS: dict[str, tuple[str, KeyMaker]] = {
    "ed25519": ("EdDSA", ed25519.Ed25519PrivateKey.generate),
    "ed448": ("EdDSA", ed448.Ed448PrivateKey.generate),
    "p256": ("ES256", lambda: ec.generate_private_key(ec.SECP256R1())),
}


def _pem_pair(tmp_path: Path, name: str, make: KeyMaker) -> tuple[Path, Path]:
    """A fresh private key (PKCS#8 PEM) and its public key (SPKI PEM) in two files."""
    key = make()
    private = tmp_path / f"{name}.key"
    public = tmp_path / f"{name}.pub"
    private.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    public.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return private, public


@pytest.mark.parametrize("kind", sorted(KINDS))
async def test_asymmetric_tokens_work_end_to_end_and_only_with_our_key(
    pg_url: str, tmp_path: Path, kind: str
) -> None:
    algorithm, make = KINDS[kind]
    private, public = _pem_pair(tmp_path, "gateway", make)
    other_private, _ = _pem_pair(tmp_path, "attacker", make)
    settings = auth_settings(
        pg_url,
        JWT_ALGORITHM=algorithm,
        JWT_SECRET=None,
        JWT_PRIVATE_KEY_FILE=str(private),
        JWT_PUBLIC_KEY_FILE=str(public),
    )
    async with auth_app(settings) as (_, client):
        admin = await login(client, "admin", ADMIN_PASSWORD)
        await create_user(client, admin["access_token"], "carol")
        carol = await login(client, "carol", USER_PASSWORD)
        me = await client.get("/api/auth/me", headers=bearer(carol["access_token"]))
        refreshed = await client.post(
            "/api/auth/refresh", json={"refresh_token": carol["refresh_token"]}
        )
        assert refreshed.status_code == 200, refreshed.text
        me_again = await client.get(
            "/api/auth/me", headers=bearer(refreshed.json()["access_token"])
        )

        # The same claims and header (kid included), signed with a key that is not ours.
        header = jwt.get_unverified_header(carol["access_token"])
        claims = jwt.decode(carol["access_token"], options={"verify_signature": False})
        claims["jti"] = str(uuid.uuid4())
        forged = jwt.encode(
            claims, other_private.read_bytes(), algorithm=algorithm, headers={"kid": header["kid"]}
        )
        forged_no_kid = jwt.encode(claims, other_private.read_bytes(), algorithm=algorithm)
        # Control: the same claims signed with our key are accepted, so the 401s below are
        # about the key alone.
        resigned = jwt.encode(
            claims, private.read_bytes(), algorithm=algorithm, headers={"kid": header["kid"]}
        )
        rejected = [
            await client.get("/api/auth/me", headers=bearer(token))
            for token in (forged, forged_no_kid)
        ]
        control = await client.get("/api/auth/me", headers=bearer(resigned))
    assert header["alg"] == algorithm
    assert me.status_code == 200, me.text
    assert me.json()["username"] == "carol"
    assert me_again.status_code == 200, me_again.text
    assert me_again.json()["username"] == "carol"
    assert jwt.get_unverified_header(refreshed.json()["refresh_token"])["alg"] == algorithm
    assert control.status_code == 200, control.text
    for response in rejected:
        assert_openai_error(response, 401, "invalid_token")
