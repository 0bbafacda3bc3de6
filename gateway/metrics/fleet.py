"""The fleet's series: engines by state, the VRAM each resident engine claims per GPU,
load/wake/sleep durations, evictions and ledger mismatches.

Engines and claims are read from the manager's in-memory state when Prometheus scrapes (and on
every engine event), so a panel never shows an engine that has already left; the manager keeps
running totals of evictions and mismatches, and only their growth since the last read is added
(a read that comes late loses nothing). Durations come from the manager's operation observer.
"""

from __future__ import annotations

import collections
import contextlib
from collections.abc import Iterable

from gateway.metrics.recorders import OTHER
from gateway.metrics.series import (
    FLEET_ENGINES,
    FLEET_EVICTIONS,
    FLEET_LEDGER_MISMATCHES,
    FLEET_OPERATIONS,
    FLEET_VRAM_BUDGET,
    FLEET_VRAM_CLAIM,
    SWAP_WAIT,
)
from orchestrator.manager import EngineState, VLLMModelManager

#: The operations the manager times (`VLLMModelManager.observe_operations`).
OPERATION_KINDS = ("cold", "wake", "sleep")
#: The manager's eviction keys: why (placement, max_engines, idle) and how (sleep, stop).
EVICTION_REASONS = tuple(
    f"{why}_{how}" for why in ("placement", "max_engines", "idle") for how in ("sleep", "stop")
)


class FleetSeries:
    """Writes one manager's fleet into the gateway_fleet_* series."""

    def __init__(self, manager: VLLMModelManager) -> None:
        self._manager = manager
        self._claimed: set[tuple[str, str]] = set()  # (gpu, engine) series written last time
        self._evictions: dict[str, int] = {}  # totals already counted, by manager key
        self._mismatches = 0
        self._operations = {kind: FLEET_OPERATIONS.labels(kind=kind) for kind in OPERATION_KINDS}

    def start_at_zero(self, profile_ids: Iterable[str]) -> None:
        """Create every labelled fleet series at 0 (a fresh gateway's panels show 0, not "no
        data"): each state, operation kind and eviction reason, and each profile's swap wait."""
        for state in EngineState:
            FLEET_ENGINES.labels(state=state.value)
        for reason in (*EVICTION_REASONS, OTHER):
            FLEET_EVICTIONS.labels(reason=reason)
        for profile_id in profile_ids:
            SWAP_WAIT.labels(model=profile_id)

    def observe(self, kind: str, seconds: float) -> None:
        """One finished operation (the manager's observer callback)."""
        child = self._operations.get(kind)
        if child is None:
            child = FLEET_OPERATIONS.labels(kind=OTHER)
        child.observe(seconds)

    def sync(self) -> None:
        """Engines by state and claims from the manager now; counters grown since last time."""
        self._sync_engines()
        self._sync_claims()
        self._count()

    def clear(self) -> None:
        """Drop the claim series this fleet wrote (its manager is going away)."""
        self._drop(self._claimed)
        self._claimed = set()

    def _sync_engines(self) -> None:
        states = collections.Counter(engine.state for engine in self._manager.engines())
        for state in EngineState:
            FLEET_ENGINES.labels(state=state.value).set(states[state])

    def _sync_claims(self) -> None:
        written: set[tuple[str, str]] = set()
        for claim in self._manager.ledger().claims:
            for gpu_id in claim.gpu_ids:
                key = (str(gpu_id), claim.engine_id)
                written.add(key)
                FLEET_VRAM_CLAIM.labels(*key).set(claim.held_per_gpu)
                FLEET_VRAM_BUDGET.labels(*key).set(claim.bytes_per_gpu)
        self._drop(self._claimed - written)
        self._claimed = written

    @staticmethod
    def _drop(keys: Iterable[tuple[str, str]]) -> None:
        for key in keys:
            for gauge in (FLEET_VRAM_CLAIM, FLEET_VRAM_BUDGET):
                # 0 first: in multiprocess mode a removed child's last value stays in this
                # process's file, and a gone engine must not keep its memory there.
                gauge.labels(*key).set(0)
                with contextlib.suppress(KeyError):
                    gauge.remove(*key)

    def _count(self) -> None:
        for key, total in list(self._manager.evictions.items()):
            new = total - self._evictions.get(key, 0)
            if new > 0:
                FLEET_EVICTIONS.labels(reason=key if key in EVICTION_REASONS else OTHER).inc(new)
                self._evictions[key] = total
        mismatches = self._manager.ledger_mismatches
        if mismatches > self._mismatches:
            FLEET_LEDGER_MISMATCHES.inc(mismatches - self._mismatches)
            self._mismatches = mismatches
