"""Join the fleet as a replica: the lease, the way to the leader, and the first decision."""

from __future__ import annotations

import socket

import httpx

from gateway.engine import ModelControl
from gateway.replicas.client import LeaderClient
from gateway.replicas.election import Election
from gateway.replicas.lease import LeaderLease
from gateway.replicas.token import fleet_token
from gateway.settings import Settings


def replica_url(settings: Settings) -> str:
    """Where the other replicas reach this one (REPLICA_URL, else http://HOST:PORT)."""
    if settings.REPLICA_URL:
        return settings.REPLICA_URL.rstrip("/")
    host = "127.0.0.1" if settings.HOST in {"0.0.0.0", "::"} else settings.HOST
    return f"http://{host}:{settings.PORT}"


async def start_replica(
    settings: Settings, control: ModelControl, http: httpx.AsyncClient
) -> Election:
    """Take the lead if nobody has it (and start the fleet), else follow the leader."""
    url = replica_url(settings)
    holder = f"{socket.gethostname()} {url}"
    lease = LeaderLease(settings.DATABASE_URL, holder=holder, url=url)
    client = LeaderClient(http, lease, fleet_token(settings))
    election = Election(control, lease, client, interval_s=settings.FLEET_LEASE_INTERVAL_S)
    control.manager.start_watchdog()
    await election.begin()
    return election
