"""Waiting for a condition in async tests."""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Callable
from typing import Any


async def eventually(
    check: Callable[[], Any], timeout_s: float = 10.0, interval_s: float = 0.05
) -> Any:
    """Poll a check (async, or a plain function) until it returns something truthy; return that
    (or fail, saying what it returned last)."""
    deadline = time.monotonic() + timeout_s
    last: Any = None
    while time.monotonic() < deadline:
        last = check()
        if inspect.isawaitable(last):
            last = await last
        if last:
            return last
        await asyncio.sleep(interval_s)
    raise AssertionError(f"condition not met in {timeout_s:g}s (last: {last!r})")
