"""Tokens spent by finished requests, added to the limiter off the response path.

A request's tokens are known when it ends (a stream's at its last chunk). Adding them must not
delay the response, and one task per request cost more than the add itself under load
(bench/proxy.py), so finished requests queue their adds here and one task drains the queue:
one task per burst, whatever the concurrency.
"""

from __future__ import annotations

import asyncio

from gateway.limits.base import Limiter
from gateway.limits.rules import Rule
from gateway.logging import get_logger

log = get_logger(__name__)


class TokenLedger:
    """Queues (key, rules, tokens) adds and applies them in order in one background task."""

    def __init__(self, limiter: Limiter) -> None:
        self._limiter = limiter
        self._pending: list[tuple[str, tuple[Rule, ...], int]] = []
        self._task: asyncio.Task[None] | None = None

    @property
    def pending(self) -> int:
        """Adds queued and not applied yet."""
        return len(self._pending)

    def add(self, key: str, rules: tuple[Rule, ...], tokens: int) -> None:
        """Queue `tokens` spent by `key` (applied soon, in order)."""
        if tokens <= 0 or not rules:
            return
        self._pending.append((key, rules, tokens))
        if self._task is None:
            self._task = asyncio.ensure_future(self._drain())

    async def _drain(self) -> None:
        try:
            while self._pending:
                batch, self._pending = self._pending, []
                for key, rules, tokens in batch:
                    try:
                        await self._limiter.add(key, rules, tokens)
                    except Exception as exc:
                        log.warning("token_add_failed", error=type(exc).__name__)
        finally:
            self._task = None

    async def aclose(self) -> None:
        """Apply what is queued (at shutdown)."""
        if self._task is not None:
            await asyncio.gather(self._task, return_exceptions=True)
        if self._pending:
            await self._drain()
