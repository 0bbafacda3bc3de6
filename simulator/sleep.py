"""vLLM's sleep contract, simulated: levels, wake tags, the level-2 weight reload, the time each
step takes and the GPU memory it frees.

As in vLLM (docs/features/sleep_mode.md): ``POST /sleep?level=1`` backs the weights up in host
RAM and drops the KV cache, ``level=2`` drops both; ``POST /wake_up`` wakes everything, or only
the memory of the tags named (``?tags=weights``, ``?tags=kv_cache``) and answers ``"sleeping"``
while a tag is still asleep. After a level-2 sleep the weights must be reloaded once their
memory is back (``POST /collective_rpc`` with ``{"method": "reload_weights"}``); until then the
simulator refuses completions (vLLM would answer from garbage weights), so a client that skips
the reload is caught.

Memory is simulated per GPU of the engine's set, from the claim it was started with
(``gpu_memory_bytes``): all of it while awake; while asleep only a residual (its CUDA context,
``sleep_residual_bytes``), plus the memory of each tag already woken (the weights,
``weights_bytes``, and the rest: KV cache and activations).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence

from simulator.config import SimulatorConfig
from simulator.errors import SimulatorRequestError

logger = logging.getLogger("simulator")

WEIGHTS = "weights"
KV_CACHE = "kv_cache"
TAGS = (WEIGHTS, KV_CACHE)
RELOAD_WEIGHTS = "reload_weights"


class SleepMode:
    """The engine's sleep state; every change waits for the one before it (one lock)."""

    def __init__(self, config: SimulatorConfig) -> None:
        """An awake engine holding its whole claim."""
        self.config = config
        self.asleep: frozenset[str] = frozenset()
        # The level of the last sleep, while a tag is still asleep; 0 once everything is awake.
        self.level = 0
        # A level-2 sleep dropped the weights; reload_weights brings them back.
        self.weights_discarded = False
        # Sleeps asked for while requests were running (vLLM aborts or crashes them: drain first).
        self.sleeps_while_running = 0
        self._pausing = False
        self._lock = asyncio.Lock()
        claim = config.gpu_memory_bytes
        self.residual_bytes = min(config.sleep_residual_bytes, claim)
        self.weights_bytes = config.weights_bytes or (claim - self.residual_bytes) // 2
        self.kv_cache_bytes = claim - self.residual_bytes - self.weights_bytes

    # --- what the engine serves ----------------------------------------------------------------

    @property
    def is_sleeping(self) -> bool:
        """What ``GET /is_sleeping`` says: a tag is still asleep."""
        return bool(self.asleep)

    def refusal(self) -> str | None:
        """Why a completion is refused now (503), or None when the engine serves."""
        if self.asleep or self._pausing:
            return "The engine is sleeping (simulated); POST /wake_up first."
        if self.weights_discarded:
            return (
                "The engine's weights were discarded by a level-2 sleep (simulated); POST "
                '/collective_rpc {"method": "reload_weights"} before serving.'
            )
        return None

    # --- the contract --------------------------------------------------------------------------

    async def sleep(self, level: int, *, running: int) -> None:
        """Put everything to sleep at `level` (1 or 2), after the configured delay."""
        async with self._lock:
            if running:
                self.sleeps_while_running += 1
            # Requests arriving while it falls asleep are refused at once.
            self._pausing = True
            try:
                await asyncio.sleep(self.config.sleep_delay_s)
            finally:
                self._pausing = False
            self.asleep = frozenset(TAGS)
            self.level = level
            self.weights_discarded = self.weights_discarded or level == 2
            logger.info(
                "vLLM SIMULATOR: sleeping at level %s: freed %d bytes, %d still in use",
                level,
                self.freed_bytes,
                self.allocated_bytes,
            )

    async def wake_up(self, tags: Sequence[str]) -> bool:
        """Wake the memory of `tags` (all of it when none); True once nothing is asleep.

        Waking the weights takes the configured wake delay (vLLM copies them back from host
        RAM, or maps their memory again for a reload); the KV cache alone wakes at once.
        """
        unknown = sorted(set(tags) - set(TAGS))
        if unknown:
            raise SimulatorRequestError(
                f"unknown tags {unknown}: the tags are {', '.join(TAGS)} (none: all)."
            )
        async with self._lock:
            waking = self.asleep & frozenset(tags or TAGS)
            if WEIGHTS in waking:
                await asyncio.sleep(self.config.wake_delay_s)
            self.asleep -= waking
            if not self.asleep:
                self.level = 0
            logger.info("vLLM SIMULATOR: woke %s", ", ".join(sorted(waking)) or "nothing")
            return not self.asleep

    async def collective_rpc(self, method: str) -> None:
        """Run `method` on the (one) simulated worker: only ``reload_weights`` is simulated.

        It reloads the weights a level-2 sleep dropped, into memory that must be awake, and
        takes the wake delay (reading them again from disk).
        """
        if method != RELOAD_WEIGHTS:
            raise SimulatorRequestError(
                f"method {method!r} is not simulated; the simulator runs only {RELOAD_WEIGHTS!r}."
            )
        async with self._lock:
            if WEIGHTS in self.asleep:
                raise SimulatorRequestError(
                    "The weights' memory is asleep: POST /wake_up?tags=weights before "
                    "reload_weights.",
                    409,
                )
            await asyncio.sleep(self.config.wake_delay_s)
            self.weights_discarded = False
            logger.info("vLLM SIMULATOR: weights reloaded")

    # --- simulated memory (per GPU of the engine's set) ---------------------------------------

    @property
    def allocated_bytes(self) -> int:
        """GPU memory held now: the residual, plus every tag that is awake."""
        held = {WEIGHTS: self.weights_bytes, KV_CACHE: self.kv_cache_bytes}
        return self.residual_bytes + sum(held[tag] for tag in TAGS if tag not in self.asleep)

    @property
    def freed_bytes(self) -> int:
        """GPU memory that sleep has freed and that is still free."""
        return self.config.gpu_memory_bytes - self.allocated_bytes

    @property
    def cpu_backup_bytes(self) -> int:
        """Host RAM holding the weights: while they sleep at level 1."""
        kept = WEIGHTS in self.asleep and not self.weights_discarded
        return self.weights_bytes if kept else 0
