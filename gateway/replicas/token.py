"""The token replicas show each other: derived from the JWT secret they share."""

from __future__ import annotations

import hashlib
import hmac

from gateway.settings import Settings

HEADER = "X-Fleet-Token"


def fleet_token(settings: Settings) -> str:
    """HMAC-SHA256 of a fixed purpose under JWT_SECRET (every replica has the same secret)."""
    secret = settings.JWT_SECRET.get_secret_value() if settings.JWT_SECRET else ""
    return hmac.new(secret.encode(), b"vcg fleet replica", hashlib.sha256).hexdigest()


def token_matches(settings: Settings, given: str | None) -> bool:
    """Whether a request carries this fleet's token (compared in constant time)."""
    return given is not None and hmac.compare_digest(given, fleet_token(settings))
