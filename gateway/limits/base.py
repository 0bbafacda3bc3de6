"""What every limiter answers (Decision) and the interface the gateway codes against."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from gateway.limits.rules import Rule


class LimiterUnavailable(Exception):
    """The shared limiter could not be asked (Redis unreachable) and this route fails closed."""

    def __init__(self, message: str = "rate limiter unavailable", retry_after_s: int = 5) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


@dataclass(frozen=True)
class RuleState:
    """One rule after a call: ``remaining`` units now, ``reset_s`` until its budget is full."""

    name: str
    header_name: str
    limit: int
    remaining: int
    reset_s: int


@dataclass(frozen=True)
class Decision:
    """The answer to one call: allowed or not, each rule's state, and when to retry."""

    allowed: bool
    retry_after_s: int  # 0 when allowed, at least 1 when denied
    rules: tuple[RuleState, ...]

    def rule(self, name: str) -> RuleState:
        """The state of the rule called ``name``; raises KeyError when the call had no such rule."""
        for state in self.rules:
            if state.name == name:
                return state
        raise KeyError(name)

    def headers(self) -> dict[str, str]:
        """``X-RateLimit-Limit-<Rule>`` and ``X-RateLimit-Remaining-<Rule>`` per rule, and
        ``Retry-After`` when denied."""
        headers: dict[str, str] = {}
        for state in self.rules:
            headers[f"X-RateLimit-Limit-{state.header_name}"] = str(state.limit)
            headers[f"X-RateLimit-Remaining-{state.header_name}"] = str(state.remaining)
        if not self.allowed:
            headers["Retry-After"] = str(self.retry_after_s)
        return headers


ALLOW_UNLIMITED = Decision(allowed=True, retry_after_s=0, rules=())


class Limiter(Protocol):
    """A rate limiter; keys name who is limited (``user:42``, ``ip:192.0.2.1``)."""

    async def hit(self, key: str, rules: Sequence[Rule], cost: int = 1) -> Decision:
        """Check every rule and, only if all allow, count ``cost`` in each (a denial costs
        nothing)."""
        ...

    async def peek(self, key: str, rules: Sequence[Rule], cost: int = 1) -> Decision:
        """Would ``hit`` with this cost be allowed now? Counts nothing."""
        ...

    async def gated_hit(
        self, key: str, gate: Sequence[Rule], rules: Sequence[Rule], cost: int = 1
    ) -> tuple[Decision, Decision]:
        """``peek`` the ``gate`` rules and, only if they allow, ``hit`` the others, atomically in
        one call (one round trip to Redis). Returns (the gate's decision, the others'); when the
        gate denies, nothing is counted and the second decision is what a peek would say."""
        ...

    async def add(self, key: str, rules: Sequence[Rule], amount: int) -> None:
        """Count ``amount`` in every rule even past the limit (usage known only afterwards)."""
        ...

    async def ping(self) -> None:
        """Raise if the limiter's store cannot be reached."""
        ...
