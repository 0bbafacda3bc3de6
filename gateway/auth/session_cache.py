"""Access-token sessions checked recently: a JWT's principal without the database.

Two things are kept: access tokens that verified (until they expire: verifying one again would
only repeat the same computation), and sessions found active, for a short while. An access
token's session is checked against the database (its user active, its session not revoked) on
a miss; the outcome is kept for `ttl_s` seconds, keyed by user and session (refresh family), as
the key cache keeps API keys. A logout, a revoked session, a deactivation, a role or tier change
or a password change made through this process drops the entries at once (after its commit); one
made through ANOTHER gateway process, or directly in the database, reaches this one within
`ttl_s` seconds. A generation counter keeps a lookup that read the database before such a change
from storing its stale result after the change dropped the entry.
"""

from __future__ import annotations

import time
import uuid
from collections import OrderedDict
from typing import NamedTuple

from gateway.principal import Principal

# Same bound as the key cache (KEY_CACHE_TTL_S): both kinds of credential behave alike.
SESSION_CACHE_TTL_S = 5.0
SESSION_CACHE_MAX_ENTRIES = 10_000


class _Session(NamedTuple):
    expires_monotonic: float
    principal: Principal


class SessionCache:
    """Principals of sessions found active, by (user id, session id); bounded, LRU."""

    def __init__(
        self, *, ttl_s: float = SESSION_CACHE_TTL_S, max_entries: int = SESSION_CACHE_MAX_ENTRIES
    ) -> None:
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self.generation = 0
        self._entries: OrderedDict[tuple[uuid.UUID, uuid.UUID | None], _Session] = OrderedDict()
        # Access tokens that verified, with their user, session and expiry: a client sending
        # the same token again is not verified again. bench/proxy.py measured verifying
        # (PyJWT: header, signature, claims) at about 190 us of CPU per request, most of the
        # JWT path's cost; the lookup is a dict read.
        self._verified: dict[str, tuple[uuid.UUID, uuid.UUID | None, float]] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, user_id: uuid.UUID, family_id: uuid.UUID | None) -> Principal | None:
        """The principal of an active session seen less than `ttl_s` ago, else None."""
        key = (user_id, family_id)
        entry = self._entries.get(key)
        if entry is None:
            return None
        if entry.expires_monotonic <= time.monotonic():
            del self._entries[key]
            return None
        self._entries.move_to_end(key)
        return entry.principal

    def put(
        self,
        user_id: uuid.UUID,
        family_id: uuid.UUID | None,
        principal: Principal,
        *,
        generation: int,
    ) -> None:
        """Remember an active session looked up when the generation was `generation`."""
        if self.ttl_s <= 0 or generation != self.generation:
            return
        key = (user_id, family_id)
        self._entries[key] = _Session(time.monotonic() + self.ttl_s, principal)
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    def invalidate_user(self, user_id: uuid.UUID) -> None:
        """Forget every session of a user (deactivated, changed, or logged out everywhere)."""
        self.generation += 1
        for key in [k for k in self._entries if k[0] == user_id]:
            del self._entries[key]

    def invalidate_families(self, family_ids: set[uuid.UUID]) -> None:
        """Forget the given sessions (logged out, or revoked after a refresh token's reuse)."""
        self.generation += 1
        for key in [k for k in self._entries if k[1] in family_ids]:
            del self._entries[key]

    def verified(self, token: str) -> tuple[uuid.UUID, uuid.UUID | None] | None:
        """The user and session of an access token that verified before and has not expired."""
        found = self._verified.get(token)
        if found is None or found[2] <= time.time():
            return None
        return found[0], found[1]

    def remember_verified(
        self, token: str, user_id: uuid.UUID, family_id: uuid.UUID | None, expires_at: float
    ) -> None:
        """Remember an access token that verified (signature, issuer, audience, type, expiry),
        until it expires (`expires_at`, seconds since the epoch)."""
        if len(self._verified) >= self.max_entries:
            self._verified.clear()
        self._verified[token] = (user_id, family_id, expires_at)

    def clear(self) -> None:
        """Forget everything."""
        self.generation += 1
        self._entries.clear()
        self._verified.clear()


# One cache per process: the database is the source of truth, the cache only saves lookups.
SESSION_CACHE = SessionCache()
