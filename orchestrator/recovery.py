"""Crash recovery: when a dead engine is restarted, when the manager gives up, and what users and
the public are told about an engine that does not serve (DESIGN.md, "Restarts").

Pure: no I/O and no clock of its own (callers pass `time.monotonic()` readings), so the policy is
tested without processes.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum


class Failure(StrEnum):
    """Why the engine does not serve, as a stable code.

    Users (a 503's message) and the public (`/health/ready`) see the code and its fixed
    sentence (`PUBLIC_REASONS`), never the engine's own output: its last log line can name
    its port, its paths and its arguments. The detail (`EngineStatus.error`, the log tail) is
    for admins.
    """

    NOT_STARTED = "engine_not_started"
    START_FAILED = "engine_start_failed"
    CRASHED = "engine_crashed"
    RESTARTING = "engine_restarting"
    CRASH_LOOP = "engine_crash_loop"
    NOT_STOPPED = "engine_not_stopped"
    ASLEEP = "engine_asleep"
    NODE_LOST = "engine_node_lost"
    ERROR = "engine_error"


#: The one sentence per code that leaves the admin API. NOT_STARTED's is a fallback: the
#: gateway gives its own reason (the planner's verdict, built from the validated profiles).
PUBLIC_REASONS: Mapping[Failure, str] = {
    Failure.NOT_STARTED: "no engine was started",
    Failure.START_FAILED: "the engine failed to start",
    Failure.CRASHED: "the engine stopped unexpectedly",
    Failure.RESTARTING: "the engine stopped unexpectedly and is being restarted",
    Failure.CRASH_LOOP: (
        "the engine crashed repeatedly and is not restarted again until an administrator acts"
    ),
    Failure.NOT_STOPPED: (
        "an engine could not be confirmed stopped; an administrator must retry the stop"
    ),
    Failure.ASLEEP: "the engine is asleep",
    Failure.NODE_LOST: ("the engine's node left the cluster and no remaining node has room for it"),
    Failure.ERROR: "the engine manager hit an unexpected error",
}


@dataclass(frozen=True)
class RestartPolicy:
    """How an engine that died on its own is restarted.

    Each crash (the engine exited while serving, or a restart of it failed) waits
    `backoff_s`, doubled for every earlier crash within `window_s` and capped at
    `backoff_max_s`, then starts the same profile again. A crash that would be restart
    number `max_restarts + 1` within the window is a crash loop: the engine stays FAILED.
    `max_restarts=0` turns restarts off.
    """

    max_restarts: int = 3
    window_s: float = 600.0
    backoff_s: float = 2.0
    backoff_max_s: float = 60.0

    def __post_init__(self) -> None:
        """Refuse a policy that cannot work, naming the field."""
        if self.max_restarts < 0:
            raise ValueError("max_restarts must be >= 0")
        if self.window_s <= 0:
            raise ValueError("window_s must be > 0")
        if self.backoff_s < 0 or self.backoff_max_s < 0:
            raise ValueError("backoff_s and backoff_max_s must be >= 0")

    @property
    def enabled(self) -> bool:
        """False when dead engines are never restarted."""
        return self.max_restarts > 0

    def delay_s(self, crashes: int) -> float:
        """The wait before the restart that follows the `crashes`-th crash in the window."""
        exponent = max(crashes - 1, 0)
        # Capped before the power grows: 2 ** 1000 would overflow a float.
        if exponent >= 64:
            return self.backoff_max_s
        return min(self.backoff_s * float(2**exponent), self.backoff_max_s)


class CrashWindow:
    """The crashes of the engine within the policy's window (monotonic times, oldest first)."""

    def __init__(self, policy: RestartPolicy) -> None:
        self.policy = policy
        self._times: deque[float] = deque()

    def _forget_old(self, now: float) -> None:
        while self._times and now - self._times[0] >= self.policy.window_s:
            self._times.popleft()

    def record(self, now: float) -> int:
        """Count a crash at `now`; return the crashes within the window, this one included."""
        self._forget_old(now)
        self._times.append(now)
        # Only the last max_restarts + 1 matter to the verdict; the deque stays small.
        while len(self._times) > self.policy.max_restarts + 1:
            self._times.popleft()
        return len(self._times)

    def count(self, now: float) -> int:
        """Crashes within the window ending at `now`."""
        self._forget_old(now)
        return len(self._times)

    def is_loop(self, crashes: int) -> bool:
        """Whether `crashes` within the window are more than the policy restarts."""
        return crashes > self.policy.max_restarts

    def clear(self) -> None:
        """Forget every crash (an operator started, stopped or switched the engine)."""
        self._times.clear()
