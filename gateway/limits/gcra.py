"""GCRA, the algorithm both limiters run: the Python twin of the Lua script in redis_limiter.

Each (key, rule) stores one integer, the theoretical arrival time (TAT, microseconds): the moment
the rule's budget would be full again. A unit costs ``interval = ceil(window / limit)``; a call of
``cost`` units is allowed when ``max(TAT, now) + cost * interval - now <= limit * interval``,
i.e. when it fits in what has refilled. The budget refills continuously: ``limit`` units may
burst at once, then one more every ``interval``; after ``window_s`` idle it is full again.

All arithmetic is on integers below 2**53, so Lua's doubles and Python's ints agree exactly and
both limiters give the same decisions for the same sequence of calls.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum

from gateway.limits.base import Decision, RuleState
from gateway.limits.rules import MAX_WINDOW_S, MICROS_PER_S, Rule

# No TAT is pushed further than this past now, however large an ``add``: keeps values exact.
MAX_AHEAD_US = 10 * MAX_WINDOW_S * MICROS_PER_S
# Largest accepted cost / amount (far above any token count; keeps the arguments sane).
MAX_COST = 2**40


class Op(StrEnum):
    """What a call does: check and count, only check, or count unconditionally."""

    HIT = "hit"
    PEEK = "peek"
    ADD = "add"


@dataclass(frozen=True)
class Outcome:
    """Raw result of one call, as the Lua script returns it: microseconds, before rounding."""

    allowed: bool
    wait_us: int
    remaining: tuple[int, ...]
    reset_us: tuple[int, ...]


def check_call(rules: Sequence[Rule], cost: int, op: Op) -> None:
    """Reject calls no limiter can answer consistently: duplicate rule names, bad costs."""
    if len(rules) > 1:  # one rule cannot clash with itself (the common case, checked often)
        names = [rule.name for rule in rules]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate rule names in one call: {names}")
    lowest = 0 if op is Op.ADD else 1
    if not lowest <= cost <= MAX_COST:
        raise ValueError(f"{op.value}: cost must be {lowest}..{MAX_COST}, got {cost}")


def apply(op: Op, now_us: int, tats: Sequence[int], rules: Sequence[Rule], cost: int) -> Outcome:
    """Run one call against stored TATs (0 for a missing key) and return the outcome.

    The new TATs to store are ``now_us + outcome.reset_us[i]`` when ``writes(op, outcome)``.
    """
    current = [max(tat, now_us) for tat in tats]
    allowed = True
    wait_us = 0
    if op is not Op.ADD:
        for tat, rule in zip(current, rules, strict=True):
            capacity = rule.limit * rule.interval_us
            needed = cost * rule.interval_us
            # A cost above the limit never fits: report the full window as the wait.
            rule_wait = capacity if needed > capacity else tat + needed - capacity - now_us
            if rule_wait > 0:
                allowed = False
                wait_us = max(wait_us, rule_wait)
    write = op is Op.ADD or (op is Op.HIT and allowed)
    after = [
        min(tat + cost * rule.interval_us, now_us + MAX_AHEAD_US) if write else tat
        for tat, rule in zip(current, rules, strict=True)
    ]
    remaining = tuple(
        max(0, (rule.limit * rule.interval_us - (tat - now_us)) // rule.interval_us)
        for tat, rule in zip(after, rules, strict=True)
    )
    return Outcome(allowed, wait_us, remaining, tuple(tat - now_us for tat in after))


def writes(op: Op, outcome: Outcome) -> bool:
    """Whether the call stores new TATs."""
    return op is Op.ADD or (op is Op.HIT and outcome.allowed)


def _ceil_s(micros: int) -> int:
    return -(-micros // MICROS_PER_S)


def to_decision(outcome: Outcome, rules: Sequence[Rule]) -> Decision:
    """Round an outcome to whole seconds and attach the rules it was computed for."""
    states = tuple(
        RuleState(
            name=rule.name,
            header_name=rule.header_name,
            limit=rule.limit,
            remaining=remaining,
            reset_s=_ceil_s(reset_us),
        )
        for rule, remaining, reset_us in zip(
            rules, outcome.remaining, outcome.reset_us, strict=True
        )
    )
    retry_after_s = 0 if outcome.allowed else max(1, _ceil_s(outcome.wait_us))
    return Decision(allowed=outcome.allowed, retry_after_s=retry_after_s, rules=states)
