"""Model management: views over ModelControl, and the switch with its refusals."""

from __future__ import annotations

from dataclasses import asdict

from gateway.engine import ModelControl, ProfileDoesNotFit, ProfileNotFound
from gateway.errors import GatewayError
from gateway.models_api.schemas import (
    EngineView,
    GpuInventoryView,
    GpuView,
    JobEventView,
    ModelStatus,
    ProfileList,
    ProfileView,
    ReloadResult,
    SwitchJobView,
)
from orchestrator.gpus import GpuInventory
from orchestrator.manager import EngineBusy, EngineEvent, SwitchJob
from orchestrator.profiles import ProfileError


def gpu_view(inventory: GpuInventory) -> GpuInventoryView:
    """The inventory as the API shows it."""
    return GpuInventoryView(
        count=inventory.count,
        source=inventory.source,
        reason=inventory.reason,
        driver_version=inventory.driver_version,
        gpus=[
            GpuView(**{**asdict(g), "processes": [asdict(p) for p in g.processes]})
            for g in inventory.gpus
        ],
    )


def event_view(event: EngineEvent) -> JobEventView:
    """One progress event."""
    return JobEventView(
        state=event.state.value, message=event.message, progress=event.progress, at=event.at
    )


def job_view(job: SwitchJob) -> SwitchJobView:
    """A switch job; engine logs are shown only when it did not succeed."""
    return SwitchJobView(
        job_id=job.id,
        profile_id=job.profile_id,
        previous_profile_id=job.previous_profile_id,
        status=job.status.value,
        created_at=job.created_at,
        finished_at=job.finished_at,
        error=job.error,
        events=[event_view(e) for e in job.events],
        logs=job.logs if job.error else [],
    )


def engine_view(*, control: ModelControl) -> EngineView:
    """The engine's current state, with the detail only admins see (errors, log lines)."""
    status = control.status()
    policy = control.manager.restart_policy
    restarts = control.manager.restart_counts()
    return EngineView(
        profile_id=status.profile_id,
        served_model_name=status.served_model_name,
        served_names=list(status.served_names),
        state=status.state.value,
        since=status.since,
        in_flight=status.in_flight,
        error=status.error,
        engine_url=status.base_url,
        failure=status.failure.value if status.failure else None,
        reason=status.reason,
        asleep=status.asleep,
        recent_crashes=status.recent_crashes,
        restart_limit=policy.max_restarts,
        restart_window_s=policy.window_s,
        restart_at=status.restart_at,
        restarts=restarts.get(status.profile_id, 0) if status.profile_id else 0,
        logs=list(status.logs),
    )


def model_status(*, control: ModelControl) -> ModelStatus:
    """Active profile, state, engine URL, the running job and the GPUs."""
    job = control.manager.current_job
    return ModelStatus(
        engine=engine_view(control=control),
        job=job_view(job) if job else None,
        gpus=gpu_view(control.inventory()),
    )


def list_profiles(*, control: ModelControl) -> ProfileList:
    """Every profile with its fit verdict on this hardware."""
    verdicts = control.verdicts()
    active = control.status().profile_id
    default = control.profiles.default_id
    views = []
    for profile_id, verdict in verdicts.items():
        profile = control.profile(profile_id)
        views.append(
            ProfileView(
                id=profile_id,
                display_name=profile.display_name,
                description=profile.description,
                engine=profile.engine.value,
                runtime=profile.runtime.value,
                model=profile.model,
                served_model_name=profile.served_model_name,
                aliases=list(profile.aliases),
                quantization=profile.quantization.value,
                is_default=profile_id == default,
                is_active=profile_id == active,
                verdict=verdict.to_dict(),
            )
        )
    return ProfileList(default_profile=default, active_profile=active, profiles=views)


def switch(*, control: ModelControl, profile_id: str) -> SwitchJobView:
    """Start a switch; 404 for an unknown profile, 409 when it does not fit or one runs."""
    try:
        job = control.switch(profile_id)
    except ProfileNotFound as exc:
        valid = ", ".join(exc.valid)
        raise GatewayError(
            404,
            f"No profile {profile_id!r}. Valid profile ids: {valid}.",
            code="profile_not_found",
            param="profile_id",
        ) from None
    except ProfileDoesNotFit as exc:
        raise GatewayError(
            409,
            f"Profile {profile_id!r} does not fit this hardware: " + "; ".join(exc.verdict.reasons),
            code="profile_does_not_fit",
            param="profile_id",
        ) from None
    except EngineBusy as exc:
        running = f" (job {exc.job_id})" if exc.job_id else ""
        raise GatewayError(
            409, f"{exc}{running}; wait for it to finish.", code="switch_in_progress"
        ) from None
    return job_view(job)


def get_job(*, control: ModelControl, job_id: str) -> SwitchJobView:
    """A switch job by id; 404 when unknown."""
    job = control.manager.job(job_id)
    if job is None:
        raise GatewayError(404, f"No switch job {job_id!r}.", code="job_not_found")
    return job_view(job)


def recommendations(*, control: ModelControl) -> list[ProfileView]:
    """Profiles that fit this hardware, best first."""
    by_id = {p.id: p for p in list_profiles(control=control).profiles}
    return [by_id[v.profile_id] for v in control.recommendations() if v.profile_id in by_id]


def reload_profiles(*, control: ModelControl) -> ReloadResult:
    """Re-read model_profiles.yml; a bad file is a 422 naming the problem, old profiles stay."""
    try:
        fresh = control.reload_profiles()
    except ProfileError as exc:
        raise GatewayError(
            422,
            f"model_profiles.yml was not reloaded, the previous profiles stay in use: {exc}",
            code="invalid_profiles",
        ) from None
    return ReloadResult(
        profiles=len(fresh.profiles), default_profile=fresh.default_id, source=fresh.source
    )
