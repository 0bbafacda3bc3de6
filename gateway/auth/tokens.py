"""JSON Web Tokens: issue and verify access and refresh tokens (RFC 8725 best practices).

- One algorithm, pinned by JWT_ALGORITHM; a token naming any other (`none`, HS512 when HS256 is
  pinned, HS256 signed with an RSA public key) is refused before its signature is looked at.
- HS* sign with JWT_SECRET; RS*/ES256/EdDSA verify with JWT_PUBLIC_KEY_FILE and sign with
  JWT_PRIVATE_KEY_FILE. Key files are read once and checked against the algorithm at startup.
- Keys come only from our configuration: a token whose header carries `jku`, `x5u`, `jwk`,
  `x5c` (or a `crit` extension, or a `kid` that is not ours) is refused and nothing is fetched.
- Every claim below is required; `iss` and `aud` must equal ours exactly; `typ` must be the kind
  the caller expects, so a refresh token never works as an access token (and back).
"""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Final, Literal

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from jwt.algorithms import Algorithm, get_default_algorithms

from gateway.errors import GatewayError
from gateway.settings import Settings

TokenType = Literal["access", "refresh"]

# Bumped when the claim set changes incompatibly; tokens of another version are refused.
TOKEN_FORMAT_VERSION: Final = 1
REQUIRED_CLAIMS: Final = ["exp", "iat", "nbf", "iss", "aud", "sub", "jti", "typ"]
# Header parameters that would let a token choose its own verification key, or demand
# extensions we do not implement.
_FORBIDDEN_HEADERS: Final = frozenset({"jku", "x5u", "jwk", "x5c", "crit"})

# Raise (instead of warn) when a key is shorter than its algorithm needs.
_JWT = jwt.PyJWT(options={"enforce_minimum_key_length": True})


@dataclass(frozen=True)
class IssuedToken:
    """A signed token and what the caller needs to know about it."""

    token: str
    jti: uuid.UUID
    expires_at: datetime
    lifetime_s: int


@dataclass(frozen=True)
class TokenClaims:
    """The verified claims of a token."""

    user_id: uuid.UUID
    jti: uuid.UUID
    family_id: uuid.UUID | None
    kind: TokenType
    issued_at: datetime
    expires_at: datetime


@dataclass(frozen=True)
class _KeySet:
    algorithm: str
    signing_key: Any | None
    verifying_key: Any
    kid: str


def invalid_token(message: str = "Invalid token.") -> GatewayError:
    """The one 401 every token failure becomes."""
    return GatewayError(
        401,
        message,
        code="invalid_token",
        headers={"WWW-Authenticate": 'Bearer error="invalid_token"'},
    )


def looks_like_jwt(token: str) -> bool:
    """True for the compact serialization's shape (three dot-separated parts)."""
    return token.count(".") == 2


def check_token_keys(settings: Settings) -> None:
    """Load the configured keys now, so a bad key file stops startup instead of a login."""
    _keys(settings)


def issue_token(
    settings: Settings,
    *,
    user_id: uuid.UUID,
    kind: TokenType,
    family_id: uuid.UUID,
    now: datetime | None = None,
) -> IssuedToken:
    """Sign a new access or refresh token for this user and refresh family."""
    keys = _keys(settings)
    if keys.signing_key is None:
        raise GatewayError(
            503,
            "This gateway cannot issue tokens: JWT_PRIVATE_KEY_FILE is not set.",
            code="token_issuing_disabled",
        )
    issued = (now or datetime.now(UTC)).replace(microsecond=0)
    lifetime = (
        timedelta(hours=settings.JWT_EXPIRE_HOURS)
        if kind == "access"
        else timedelta(days=settings.JWT_REFRESH_DAYS)
    )
    jti = uuid.uuid4()
    claims = {
        "iss": settings.JWT_ISSUER,
        "aud": settings.JWT_AUDIENCE,
        "sub": str(user_id),
        "iat": issued,
        "nbf": issued,
        "exp": issued + lifetime,
        "jti": str(jti),
        "typ": kind,
        "ver": TOKEN_FORMAT_VERSION,
        "fam": str(family_id),
    }
    token = _JWT.encode(
        claims, keys.signing_key, algorithm=keys.algorithm, headers={"kid": keys.kid}
    )
    return IssuedToken(
        token=token,
        jti=jti,
        expires_at=issued + lifetime,
        lifetime_s=int(lifetime.total_seconds()),
    )


def decode_token(settings: Settings, token: str, *, expected_type: TokenType) -> TokenClaims:
    """Verify a token completely and return its claims; any failure is a 401 `invalid_token`."""
    keys = _keys(settings)
    try:
        header = jwt.get_unverified_header(token)
    except jwt.PyJWTError:
        raise invalid_token() from None
    if _FORBIDDEN_HEADERS & header.keys() or header.get("alg") != keys.algorithm:
        raise invalid_token()
    kid = header.get("kid")
    if kid is not None and not (
        isinstance(kid, str) and hmac.compare_digest(kid.encode(), keys.kid.encode())
    ):
        raise invalid_token()
    try:
        claims = _JWT.decode(
            token,
            keys.verifying_key,
            algorithms=[keys.algorithm],
            options={"require": REQUIRED_CLAIMS, "strict_aud": True},
            issuer=settings.JWT_ISSUER,
            audience=settings.JWT_AUDIENCE,
            leeway=settings.JWT_LEEWAY_S,
        )
    except jwt.ExpiredSignatureError:
        raise invalid_token("The token has expired; refresh it or log in again.") from None
    except (jwt.PyJWTError, ValueError, TypeError):
        raise invalid_token() from None
    # The library compares these too; checked again here because they are the whole point.
    if claims.get("iss") != settings.JWT_ISSUER or claims.get("aud") != settings.JWT_AUDIENCE:
        raise invalid_token()
    if claims.get("typ") != expected_type or claims.get("ver") != TOKEN_FORMAT_VERSION:
        raise invalid_token()
    try:
        user_id = uuid.UUID(claims["sub"])
        jti = uuid.UUID(claims["jti"])
        family = claims.get("fam")
        family_id = uuid.UUID(family) if family is not None else None
        issued_at = datetime.fromtimestamp(claims["iat"], UTC)
        expires_at = datetime.fromtimestamp(claims["exp"], UTC)
    except (ValueError, TypeError, AttributeError, OverflowError):
        raise invalid_token() from None
    return TokenClaims(
        user_id=user_id,
        jti=jti,
        family_id=family_id,
        kind=expected_type,
        issued_at=issued_at,
        expires_at=expires_at,
    )


def _keys(settings: Settings) -> _KeySet:
    secret = settings.JWT_SECRET.get_secret_value() if settings.JWT_SECRET else None
    return _load_keys(
        settings.JWT_ALGORITHM, secret, settings.JWT_PRIVATE_KEY_FILE, settings.JWT_PUBLIC_KEY_FILE
    )


@functools.lru_cache(maxsize=16)
def _load_keys(
    algorithm: str, secret: str | None, private_file: Path | None, public_file: Path | None
) -> _KeySet:
    algo = get_default_algorithms()[algorithm]
    if algorithm.startswith("HS"):
        if not secret:
            raise ValueError("JWT_SECRET is required for HS* algorithms")
        key = secret.encode()
        _check_length(algorithm, key, algo)
        # A kid that names the key without revealing anything about the secret.
        kid = _b64(hmac.new(key, b"vcg-jwt-kid", hashlib.sha256).digest())[:22]
        return _KeySet(algorithm=algorithm, signing_key=key, verifying_key=key, kid=kid)
    if public_file is None:
        raise ValueError(f"JWT_ALGORITHM={algorithm} needs JWT_PUBLIC_KEY_FILE")
    public_key = serialization.load_pem_public_key(public_file.read_bytes())
    _check_key_type(algorithm, public_key)
    _check_length(algorithm, public_key, algo)
    private_key: Any | None = None
    if private_file is not None:
        private_key = serialization.load_pem_private_key(private_file.read_bytes(), password=None)
        if _spki(private_key.public_key()) != _spki(public_key):
            raise ValueError("JWT_PRIVATE_KEY_FILE does not belong to JWT_PUBLIC_KEY_FILE")
    kid = _b64(hashlib.sha256(_spki(public_key)).digest())[:22]
    return _KeySet(algorithm=algorithm, signing_key=private_key, verifying_key=public_key, kid=kid)


def _check_key_type(algorithm: str, public_key: Any) -> None:
    expected: tuple[type, ...]
    if algorithm.startswith("RS"):
        expected = (rsa.RSAPublicKey,)
    elif algorithm == "ES256":
        expected = (ec.EllipticCurvePublicKey,)
        if isinstance(public_key, ec.EllipticCurvePublicKey) and not isinstance(
            public_key.curve, ec.SECP256R1
        ):
            raise ValueError("ES256 needs a P-256 key")
    elif algorithm == "EdDSA":
        expected = (ed25519.Ed25519PublicKey, ed448.Ed448PublicKey)
    else:
        raise ValueError(f"unsupported JWT_ALGORITHM {algorithm}")
    if not isinstance(public_key, expected):
        raise ValueError(f"JWT_PUBLIC_KEY_FILE does not hold a key for {algorithm}")


def _check_length(algorithm: str, key: Any, algo: Algorithm) -> None:
    message = algo.check_key_length(algo.prepare_key(key))
    if message:
        raise ValueError(f"JWT key too weak for {algorithm}: {message}")


def _spki(public_key: Any) -> bytes:
    der: bytes = public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return der


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")
