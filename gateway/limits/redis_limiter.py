"""The shared limiter: GCRA state in Redis, one Lua script (one round trip) per call."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import cast

from redis.asyncio import Redis

from gateway.limits.base import ALLOW_UNLIMITED, Decision
from gateway.limits.gcra import MAX_AHEAD_US, Op, Outcome, check_call, to_decision
from gateway.limits.rules import Rule

# The Lua twin of gcra.apply; keep both in step (tests compare their decisions call by call).
# KEYS: one per rule, the gate's rules first. ARGV: op, cost, max_ahead_us, how many of the
# rules are the gate, then interval_us and limit of each rule. The gate's rules are only checked
# (a peek); ``op`` applies to the others, and a closed gate turns a hit into a peek. Returns
# {gate_allowed, gate_wait_us, allowed, wait_us, remaining_1, reset_us_1, ...}.
_SCRIPT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local op = ARGV[1]
local cost = tonumber(ARGV[2])
local max_ahead = tonumber(ARGV[3])
local gates = tonumber(ARGV[4])
local n = #KEYS
local tats, intervals, capacities = {}, {}, {}
local gate, gate_wait = 1, 0
local allowed, wait = 1, 0
for i = 1, n do
  local interval = tonumber(ARGV[2 * i + 3])
  local capacity = interval * tonumber(ARGV[2 * i + 4])
  local tat = tonumber(redis.call('GET', KEYS[i]) or 0)
  if tat < now then tat = now end
  tats[i], intervals[i], capacities[i] = tat, interval, capacity
  if op ~= 'add' then
    local needed = cost * interval
    local rule_wait
    if needed > capacity then
      rule_wait = capacity
    else
      rule_wait = tat + needed - capacity - now
    end
    if rule_wait > 0 then
      if i <= gates then
        gate = 0
        if rule_wait > gate_wait then gate_wait = rule_wait end
      else
        allowed = 0
        if rule_wait > wait then wait = rule_wait end
      end
    end
  end
end
local write = op == 'add' or (op == 'hit' and allowed == 1 and gate == 1)
local result = {gate, gate_wait, allowed, wait}
for i = 1, n do
  local tat = tats[i]
  if write and i > gates then
    tat = math.min(tat + cost * intervals[i], now + max_ahead)
    -- A key whose TAT has passed means "budget full", exactly like a missing key.
    redis.call('SET', KEYS[i], string.format('%d', tat), 'PX',
               string.format('%d', math.ceil((tat - now) / 1000)))
  end
  local remaining = math.floor((capacities[i] - (tat - now)) / intervals[i])
  if remaining < 0 then remaining = 0 end
  result[#result + 1] = remaining
  result[#result + 1] = tat - now
end
return result
"""


class RedisLimiter:
    """GCRA over Redis, shared by every gateway process that uses the same Redis.

    Why GCRA rather than a sliding-window log or counter: one integer per (key, rule) whatever
    the limit (a log of 200,000 tokens per minute would not fit), costs of any size are native
    (token budgets), the retry time is exact, and it depends only on time differences, so the
    in-process twin agrees with it call for call (a sliding-window counter depends on where the
    fixed windows fall). The trade-off: it limits a *rate* with a burst of ``limit``; after a
    full burst the budget refills continuously (one unit per ``window / limit``), so any
    ``window_s`` span can see up to ``2 * limit - 1`` units, while the sustained rate never
    exceeds ``limit`` per ``window_s``.

    The script reads Redis ``TIME`` (all hosts share one clock), checks every rule of the call
    and writes only if all allow, atomically; ``gated_hit`` also checks a gate (the token budget)
    in the same call, so an inference request costs one round trip. Keys are
    ``prefix + key + ":" + rule.name`` and expire when their budget is full again. For Redis
    Cluster, put a hash tag in ``key`` (``{user:42}``) so one call's keys share a slot.
    """

    def __init__(self, redis: Redis, prefix: str = "rl:", *, timeout_s: float | None = 0.5) -> None:
        """``timeout_s`` bounds each call, whatever the client's own retries and backoff."""
        self._redis = redis
        self._prefix = prefix
        self._timeout_s = timeout_s
        self._script = redis.register_script(_SCRIPT)

    def keys(self, key: str, rules: Sequence[Rule]) -> list[str]:
        """The Redis keys a call with these rules touches."""
        return [f"{self._prefix}{key}:{rule.name}" for rule in rules]

    async def _eval(
        self, op: Op, key: str, rules: Sequence[Rule], cost: int, gates: int = 0
    ) -> list[int]:
        """One script call; the first ``gates`` rules are the gate (only checked)."""
        args: list[int | str] = [op.value, cost, MAX_AHEAD_US, gates]
        for rule in rules:
            args += [rule.interval_us, rule.limit]
        async with asyncio.timeout(self._timeout_s):
            return cast("list[int]", await self._script(keys=self.keys(key, rules), args=args))

    async def hit(self, key: str, rules: Sequence[Rule], cost: int = 1) -> Decision:
        """Check all rules and count ``cost`` in each only if all allow."""
        check_call(rules, cost, Op.HIT)
        if not rules:
            return ALLOW_UNLIMITED
        return to_decision(_outcome(await self._eval(Op.HIT, key, rules, cost), 2, 4), rules)

    async def peek(self, key: str, rules: Sequence[Rule], cost: int = 1) -> Decision:
        """Whether ``hit`` with this cost would be allowed now; counts nothing."""
        check_call(rules, cost, Op.PEEK)
        if not rules:
            return ALLOW_UNLIMITED
        return to_decision(_outcome(await self._eval(Op.PEEK, key, rules, cost), 2, 4), rules)

    async def gated_hit(
        self, key: str, gate: Sequence[Rule], rules: Sequence[Rule], cost: int = 1
    ) -> tuple[Decision, Decision]:
        """Peek ``gate`` and, only if it allows, hit ``rules``: one script call, atomic."""
        every = (*gate, *rules)
        check_call(every, cost, Op.HIT)
        if not every:
            return ALLOW_UNLIMITED, ALLOW_UNLIMITED
        raw = await self._eval(Op.HIT, key, every, cost, len(gate))
        split = 4 + 2 * len(gate)
        return (
            to_decision(_outcome(raw, 0, 4, split), gate),
            to_decision(_outcome(raw, 2, split), rules),
        )

    async def add(self, key: str, rules: Sequence[Rule], amount: int) -> None:
        """Count ``amount`` in every rule, even past the limit."""
        check_call(rules, amount, Op.ADD)
        if rules and amount:
            await self._eval(Op.ADD, key, rules, amount)

    async def ping(self) -> None:
        """Raise if Redis does not answer."""
        async with asyncio.timeout(self._timeout_s):
            await self._redis.ping()


def _outcome(raw: list[int], flag: int, first: int, last: int | None = None) -> Outcome:
    """The outcome whose allowed flag and wait are ``raw[flag]``, ``raw[flag + 1]`` and whose
    (remaining, reset) pairs are ``raw[first:last]``."""
    pairs = raw[first:last]
    return Outcome(raw[flag] == 1, raw[flag + 1], tuple(pairs[0::2]), tuple(pairs[1::2]))
