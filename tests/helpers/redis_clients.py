"""A Redis client configured like the gateway's own."""

from __future__ import annotations

from redis.asyncio import Redis


def gateway_like_client(url: str) -> Redis:
    """A client configured like the gateway's own (default retries with backoff included)."""
    client: Redis = Redis.from_url(url, socket_timeout=2.0, socket_connect_timeout=2.0)
    return client
