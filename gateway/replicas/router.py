"""/internal/fleet/*: a follower replica runs its fleet operations on the leader here.

Not in the OpenAPI document and not for people: the caller shows the fleet token that every
replica derives from the shared JWT secret (gateway/replicas/token.py).
"""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, ConfigDict, Field

from gateway.deps import core_resources
from gateway.engine import ModelControl, ModelsDep, ProfileDoesNotFit, ProfileNotFound
from gateway.errors import GatewayError
from gateway.replicas.token import HEADER, token_matches
from gateway.routing import GuardedRoute, header_credential
from orchestrator.manager import EngineBusy, SwitchJob

router = APIRouter(include_in_schema=False, route_class=GuardedRoute)


class FleetJobRequest(BaseModel):
    """One fleet operation, as a follower asks for it."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["switch", "load", "unload", "sleep", "wake"]
    profile_id: str = Field(min_length=1, max_length=128)
    exclusive: bool = False
    level: int | None = Field(default=None, ge=1, le=2)


class FleetJobState(BaseModel):
    """A job of the leader's."""

    id: str
    status: str
    error: str | None


def _state(job: SwitchJob) -> FleetJobState:
    return FleetJobState(id=job.id, status=job.status.value, error=job.error)


@header_credential
async def fleet_replica(request: Request) -> None:
    """401 unless the caller shows this fleet's token (run before the body is read, as every
    credential is)."""
    if not token_matches(core_resources(request).settings, request.headers.get(HEADER)):
        raise GatewayError(
            401,
            "a replica of this fleet's token is required (X-Fleet-Token)",
            code="invalid_fleet_token",
            headers={"WWW-Authenticate": "Bearer"},
        )


def _leader(models: ModelsDep, _: Annotated[None, Depends(fleet_replica)]) -> ModelControl:
    """The leader's model control, for another replica of the fleet."""
    _check(models)
    return models


LeaderDep = Annotated[ModelControl, Depends(_leader)]


def _check(models: ModelControl) -> None:
    if not models.replicated:
        raise GatewayError(404, "this gateway has no replicas", code="not_replicated")
    if models.manager.following:
        raise GatewayError(409, "this replica does not lead the fleet", code="not_leader")


@router.post("/internal/fleet/jobs", status_code=202, response_model=FleetJobState)
async def run_job(models: LeaderDep, body: FleetJobRequest) -> FleetJobState:
    """Run a follower's operation here, on the leader."""
    manager = models.manager
    try:
        if body.kind == "switch":
            job = models.switch(body.profile_id, exclusive=body.exclusive)
        elif body.kind == "load":
            job = models.load(body.profile_id)
        elif body.kind == "unload":
            job = manager.request_unload(body.profile_id)
        elif body.kind == "sleep":
            job = manager.request_sleep(body.profile_id, body.level)
        else:
            job = manager.request_wake(body.profile_id)
    except ProfileNotFound as exc:
        raise GatewayError(404, str(exc), code="profile_not_found") from exc
    except ProfileDoesNotFit as exc:
        raise GatewayError(400, str(exc), code="profile_does_not_fit") from exc
    except EngineBusy as exc:
        running = manager.job(exc.job_id) if exc.job_id else None
        if running is None:
            raise GatewayError(409, str(exc), code="engine_busy") from exc
        job = running
    return _state(job)


@router.get("/internal/fleet/jobs/{job_id}", response_model=FleetJobState)
async def job_state(job_id: str, models: LeaderDep) -> FleetJobState:
    """One of the leader's jobs."""
    job = models.manager.job(job_id)
    if job is None:
        raise GatewayError(404, f"no job {job_id}", code="job_not_found")
    return _state(job)
