"""A follower's way to the leader: each fleet operation is run there (the `Leader` protocol)."""

from __future__ import annotations

import asyncio
import time

import httpx

from gateway.replicas.lease import LeaderLease
from orchestrator.manager import SwitchJob

JOB_TIMEOUT_S = 1800.0  # a cold load of a big model
_POLL_S = 0.25


class LeaderUnreachable(Exception):
    """The leader did not take or finish the operation; the message says why."""


class LeaderClient:
    """Runs a follower's jobs on the leading replica over HTTP (its internal fleet routes)."""

    def __init__(self, http: httpx.AsyncClient, lease: LeaderLease, token: str) -> None:
        self._http = http
        self._lease = lease
        self._headers = {"X-Fleet-Token": token}

    async def run_job(self, job: SwitchJob) -> None:
        """Ask the leader to run it; wait for its outcome; raise with its error if it failed."""
        leader = await self._lease.leader()
        if leader is None or leader.holder == self._lease.holder:
            raise LeaderUnreachable("no other replica leads the fleet")
        base = leader.url.rstrip("/")
        body = {
            "kind": job.kind.value,
            "profile_id": job.profile_id,
            "exclusive": job.exclusive,
            "level": job.level,
        }
        try:
            response = await self._http.post(
                f"{base}/internal/fleet/jobs", json=body, headers=self._headers, timeout=30
            )
        except httpx.HTTPError as exc:
            raise LeaderUnreachable(f"the leader at {base} did not answer: {exc}") from exc
        if response.status_code != 202:
            raise LeaderUnreachable(f"the leader refused: {response.status_code} {response.text}")
        job_id = response.json()["id"]
        deadline = time.monotonic() + JOB_TIMEOUT_S
        while time.monotonic() < deadline:
            await asyncio.sleep(_POLL_S)
            try:
                state = await self._http.get(
                    f"{base}/internal/fleet/jobs/{job_id}", headers=self._headers, timeout=10
                )
            except httpx.HTTPError as exc:
                raise LeaderUnreachable(f"the leader at {base} went away: {exc}") from exc
            data = state.json()
            if data["status"] == "succeeded":
                return
            if data["status"] in ("failed", "rolled_back"):
                raise LeaderUnreachable(data.get("error") or "the leader's job failed")
        raise LeaderUnreachable(f"the leader's job {job_id} did not finish in time")
