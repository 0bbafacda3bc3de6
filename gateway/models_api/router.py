"""/api/models/* and /api/gpus: model management (admin only)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Depends, Path
from fastapi.sse import EventSourceResponse, ServerSentEvent

from gateway.deps import get_admin
from gateway.engine import ModelsDep
from gateway.models_api import service
from gateway.models_api.schemas import (
    PROFILE_ID_PATTERN,
    FleetView,
    GpuInventoryView,
    JobList,
    ModelStatus,
    ProfileList,
    ProfileView,
    ReloadResult,
    SleepRequest,
    SwitchJobView,
    SwitchRequest,
)
from gateway.proxy.deps import SchedulerDep
from gateway.routing import GuardedRoute

router = APIRouter(tags=["models"], dependencies=[Depends(get_admin)], route_class=GuardedRoute)

JobId = Annotated[str, Path(min_length=1, max_length=64, pattern=r"^[a-f0-9]+$")]
ProfileId = Annotated[str, Path(min_length=1, max_length=64, pattern=PROFILE_ID_PATTERN)]
# A served name or alias (no "/": a name with one is loaded by its profile id instead).
MODEL_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:@-]*$"
ModelName = Annotated[str, Path(min_length=1, max_length=128, pattern=MODEL_NAME_PATTERN)]


@router.get("/api/models/status", response_model=ModelStatus)
async def status(models: ModelsDep) -> ModelStatus:
    """The active profile, its state and engine URL, why it does not serve (with the engine's
    last log lines after a crash), its restarts, the running switch job, and the GPUs."""
    return service.model_status(control=models)


@router.get("/api/models/profiles", response_model=ProfileList)
async def profiles(models: ModelsDep) -> ProfileList:
    """Every profile with its fit verdict (and the numbers behind it) on this hardware."""
    return service.list_profiles(control=models)


@router.post("/api/models/switch", response_model=SwitchJobView, status_code=202)
async def switch(body: SwitchRequest, models: ModelsDep) -> SwitchJobView:
    """Make a profile the default model in the background (beside the resident engines, or
    alone with `exclusive`); poll the job or follow /api/models/events."""
    return service.switch(control=models, profile_id=body.profile_id, exclusive=body.exclusive)


@router.get("/api/models/switch/{job_id}", response_model=SwitchJobView)
async def switch_job(job_id: JobId, models: ModelsDep) -> SwitchJobView:
    """A job: status, progress events, and the engine's last log lines on failure."""
    return service.get_job(control=models, job_id=job_id)


@router.get("/api/models/jobs", response_model=JobList)
async def jobs(models: ModelsDep) -> JobList:
    """The recent jobs of every kind (switch, load, unload, sleep, wake), newest first."""
    return service.list_jobs(control=models)


@router.get("/api/models/jobs/{job_id}", response_model=SwitchJobView)
async def job(job_id: JobId, models: ModelsDep) -> SwitchJobView:
    """A job of any kind: status, progress events, the engine's last log lines on failure."""
    return service.get_job(control=models, job_id=job_id)


@router.get("/api/models/engines", response_model=FleetView)
async def engines(models: ModelsDep, scheduler: SchedulerDep) -> FleetView:
    """Every engine the fleet has run (state, GPUs, memory, requests, timings, its job) and
    each GPU's memory split between our engines, other processes and free."""
    return service.fleet_view(control=models, scheduler=scheduler)


@router.post("/api/models/{profile_id}/load", response_model=SwitchJobView, status_code=202)
async def load(profile_id: ProfileId, models: ModelsDep) -> SwitchJobView:
    """Load (or wake) a profile's engine beside the others, evicting only what it needs."""
    return service.load(control=models, profile_id=profile_id)


@router.post("/models/{model_name}/load", response_model=SwitchJobView, status_code=202)
async def load_by_name(model_name: ModelName, models: ModelsDep) -> SwitchJobView:
    """Seed 004's path: load a model (by served name, alias or profile id) as
    POST /api/models/{profile_id}/load does."""
    return service.load_by_name(control=models, model_name=model_name)


@router.post("/api/models/{profile_id}/unload", response_model=SwitchJobView, status_code=202)
async def unload(profile_id: ProfileId, models: ModelsDep) -> SwitchJobView:
    """Drain and stop a profile's engine."""
    return service.unload(control=models, profile_id=profile_id)


@router.post("/api/models/{profile_id}/sleep", response_model=SwitchJobView, status_code=202)
async def sleep(
    profile_id: ProfileId, models: ModelsDep, body: SleepRequest | None = None
) -> SwitchJobView:
    """Drain a ready engine and put it to sleep (vLLM sleep mode): its GPU memory is freed,
    its process kept for a fast wake."""
    level = body.level if body is not None else None
    return service.sleep(control=models, profile_id=profile_id, level=level)


@router.post("/api/models/{profile_id}/wake", response_model=SwitchJobView, status_code=202)
async def wake(profile_id: ProfileId, models: ModelsDep) -> SwitchJobView:
    """Wake a sleeping engine (started cold if the wake fails)."""
    return service.wake(control=models, profile_id=profile_id)


@router.get("/api/models/events", response_class=EventSourceResponse)
async def events(models: ModelsDep) -> AsyncIterator[ServerSentEvent]:
    """Server-sent progress events: the current status first, then every state change."""
    control = models
    yield ServerSentEvent(event="status", data=service.engine_view(control=control).model_dump())
    async for event in control.manager.subscribe():
        yield ServerSentEvent(
            event="progress",
            data={
                "profile_id": event.profile_id,
                "job_id": event.job_id,
                **service.event_view(event).model_dump(),
            },
        )


@router.get("/api/models/hardware-recommendations", response_model=list[ProfileView])
async def hardware_recommendations(models: ModelsDep) -> list[ProfileView]:
    """Profiles that fit this machine's GPUs, best first."""
    return service.recommendations(control=models)


@router.post("/api/models/reload", response_model=ReloadResult)
async def reload_profiles(models: ModelsDep) -> ReloadResult:
    """Re-read model_profiles.yml; a bad file is refused and the previous profiles stay."""
    return service.reload_profiles(control=models)


@router.get("/api/gpus", response_model=GpuInventoryView)
async def gpus(models: ModelsDep) -> GpuInventoryView:
    """Per-GPU memory, utilization, temperature, power and processes (NVML or a snapshot)."""
    return service.gpu_view(models.inventory(fresh=True))
