"""/internal/fleet/*: a follower replica runs its fleet operations on the leader here.

Not in the OpenAPI document and not for people: the caller shows the fleet token that every
replica derives from the shared JWT secret (gateway/replicas/token.py).
"""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Header, HTTPException
from pydantic import BaseModel, ConfigDict, Field

from gateway.engine import ModelsDep, ProfileDoesNotFit, ProfileNotFound
from gateway.replicas.token import token_matches
from orchestrator.manager import EngineBusy, SwitchJob

router = APIRouter(include_in_schema=False)


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


def _check(models: ModelsDep, token: str | None) -> None:
    if not token_matches(models.settings, token):
        raise HTTPException(status_code=403, detail="not a replica of this fleet")
    if models.manager.following:
        raise HTTPException(status_code=409, detail="this replica does not lead the fleet")


@router.post("/internal/fleet/jobs", status_code=202, response_model=FleetJobState)
async def run_job(
    body: FleetJobRequest,
    models: ModelsDep,
    x_fleet_token: Annotated[str | None, Header()] = None,
) -> FleetJobState:
    """Run a follower's operation here, on the leader."""
    _check(models, x_fleet_token)
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
        raise HTTPException(status_code=404, detail=str(exc)) from exc
    except ProfileDoesNotFit as exc:
        raise HTTPException(status_code=400, detail=str(exc)) from exc
    except EngineBusy as exc:
        running = manager.job(exc.job_id) if exc.job_id else None
        if running is None:
            raise HTTPException(status_code=409, detail=str(exc)) from exc
        job = running
    return _state(job)


@router.get("/internal/fleet/jobs/{job_id}", response_model=FleetJobState)
async def job_state(
    job_id: str,
    models: ModelsDep,
    x_fleet_token: Annotated[str | None, Header()] = None,
) -> FleetJobState:
    """One of the leader's jobs."""
    _check(models, x_fleet_token)
    job = models.manager.job(job_id)
    if job is None:
        raise HTTPException(status_code=404, detail=f"no job {job_id}")
    return _state(job)
