"""Which replica leads the fleet, re-decided every second.

A replica tries the lease (gateway/replicas/lease.py) until it gets it. While it does not lead,
it follows: its manager runs fleet operations on the leader (`LeaderClient`) and mirrors the
engines the leader runs from the cluster's registry of named engine actors, adopting each under
the leader's own handle, so that it serves them without starting anything. When it takes the
lease it fences the engines with its new term, adopts every engine of the fleet (none is
restarted) and leads: restarts, evictions, idle sweeps and the boot profile are its own from
then on. A leader that loses its database session stops leading at once and follows.

Failover bound: the lease is free as soon as Postgres ends the dead leader's session (at once
for a killed process, whose socket the kernel closes), and a follower tries it every
`interval_s` (1 s): a follower leads within about a second and a half of the leader's death,
plus the time to adopt the engines (one health check each).
"""

from __future__ import annotations

import asyncio
import time

from gateway.engine import ModelControl
from gateway.logging import get_logger
from gateway.replicas.client import LeaderClient
from gateway.replicas.lease import LeaderLease

log = get_logger(__name__)


class Election:
    """This replica's part in choosing the fleet's leader."""

    def __init__(
        self, control: ModelControl, lease: LeaderLease, client: LeaderClient, interval_s: float
    ) -> None:
        self._control = control
        self._lease = lease
        self._client = client
        self._interval_s = interval_s

    async def begin(self) -> None:
        """Lead at once if nobody does, else follow (and mirror the leader's engines)."""
        term = await self._lease.try_acquire()
        if term is not None:
            await self._take_over(term)
        else:
            await self._follow()

    async def run(self) -> None:
        """Keep deciding: a follower tries the lease, a leader checks it still holds it."""
        while True:
            await asyncio.sleep(self._interval_s)
            try:
                await self._round()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("fleet_election_round_failed")

    async def _round(self) -> None:
        control = self._control
        if control.role == "leader":
            if not await self._lease.held():
                await self._follow()
            return
        term = await self._lease.try_acquire()
        if term is not None:
            await self._take_over(term)
            return
        await control.manager.sync(control.known_spec)

    async def _follow(self) -> None:
        control = self._control
        control.role = "follower"
        control.term = None
        if control.ray is not None:
            control.ray.leading = False
        control.manager.follow(self._client, control.known_spec)
        leader = await self._lease.leader()
        control.leader_url = leader.url if leader else None
        log.info("fleet_following", leader=leader.holder if leader else None)
        await control.manager.sync(control.known_spec)

    async def _take_over(self, term: int) -> None:
        control = self._control
        started = time.monotonic()
        if control.ray is not None:
            await asyncio.to_thread(control.ray.fence, term)
        control.manager.lead()
        control.role = "leader"
        control.term = term
        control.leader_url = self._lease.url
        why = await control.startup()
        if control.ray is not None:
            # The engines adopted just now are held from this term on.
            await asyncio.to_thread(control.ray.fence, term)
        log.info(
            "fleet_leading",
            term=term,
            adopt_s=round(time.monotonic() - started, 3),
            plan=why,
        )

    async def aclose(self) -> None:
        """Give the lease back (the next replica leads at its next try)."""
        await self._lease.release()
