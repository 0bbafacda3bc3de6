"""Model management: views over ModelControl and the fleet, and its jobs with their refusals."""

from __future__ import annotations

from dataclasses import asdict

from gateway.engine import ModelControl, ProfileDoesNotFit, ProfileNotFound
from gateway.errors import GatewayError
from gateway.models_api.schemas import (
    EngineView,
    FleetEngineView,
    FleetGpuView,
    FleetView,
    GpuInventoryView,
    GpuShareView,
    GpuView,
    JobEventView,
    JobList,
    ModelStatus,
    NodeView,
    ProfileList,
    ProfileView,
    ReloadResult,
    SwitchJobView,
)
from gateway.proxy.scheduler import Scheduler
from gateway.proxy.service import BRINGING_UP
from orchestrator.engine import ManagedEngine
from orchestrator.gpus import GpuInfo, GpuInventory
from orchestrator.manager import EngineBusy, EngineEvent, EngineState, SwitchJob
from orchestrator.placement import Ledger, not_ours
from orchestrator.profiles import Profile, ProfileError

# The node every engine runs on while the fleet has one host (no RAY_ADDRESS).
LOCAL_NODE = "local"


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
        nodes=[NodeView(**node) for node in inventory.extra.get("nodes", ())],
    )


def event_view(event: EngineEvent) -> JobEventView:
    """One progress event."""
    return JobEventView(
        state=event.state.value, message=event.message, progress=event.progress, at=event.at
    )


def job_view(job: SwitchJob) -> SwitchJobView:
    """A job; engine logs are shown only when it did not succeed."""
    return SwitchJobView(
        job_id=job.id,
        kind=job.kind.value,
        profile_id=job.profile_id,
        previous_profile_id=job.previous_profile_id,
        exclusive=job.exclusive,
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


def _not_found(exc: ProfileNotFound) -> GatewayError:
    valid = ", ".join(exc.valid)
    return GatewayError(
        404,
        f"No profile {exc.profile_id!r}. Valid profile ids: {valid}.",
        code="profile_not_found",
        param="profile_id",
    )


def _does_not_fit(exc: ProfileDoesNotFit) -> GatewayError:
    return GatewayError(
        409,
        f"Profile {exc.verdict.profile_id!r} does not fit this hardware: "
        + "; ".join(exc.verdict.reasons),
        code="profile_does_not_fit",
        param="profile_id",
    )


def _busy(message: str, job_id: str | None, code: str = "job_in_progress") -> GatewayError:
    running = f" (job {job_id})" if job_id else ""
    return GatewayError(409, f"{message}{running}; wait for it to finish.", code=code)


def _known_profile(control: ModelControl, profile_id: str) -> Profile:
    try:
        return control.profile(profile_id)
    except ProfileNotFound as exc:
        raise _not_found(exc) from None


def _refuse_if_busy(control: ModelControl, profile_id: str) -> None:
    job = control.manager.job_for(profile_id)
    if job is not None:
        raise _busy(f"A {job.kind.value} of {profile_id} is already running", job.id)


def switch(*, control: ModelControl, profile_id: str, exclusive: bool = False) -> SwitchJobView:
    """Start a switch; 404 for an unknown profile, 409 when it does not fit or one runs."""
    try:
        job = control.switch(profile_id, exclusive=exclusive)
    except ProfileNotFound as exc:
        raise _not_found(exc) from None
    except ProfileDoesNotFit as exc:
        raise _does_not_fit(exc) from None
    except EngineBusy as exc:
        raise _busy(str(exc), exc.job_id, code="switch_in_progress") from None
    return job_view(job)


def load(*, control: ModelControl, profile_id: str) -> SwitchJobView:
    """Load (or wake) a profile's engine beside the others. A load, wake or switch already
    bringing it up is answered with that job; an unload or sleep of it is a 409."""
    _known_profile(control, profile_id)
    running = control.manager.job_for(profile_id)
    if running is not None and running.kind not in BRINGING_UP:
        raise _busy(f"A {running.kind.value} of {profile_id} is already running", running.id)
    try:
        job = control.load(profile_id)
    except ProfileNotFound as exc:
        raise _not_found(exc) from None
    except ProfileDoesNotFit as exc:
        raise _does_not_fit(exc) from None
    return job_view(job)


def load_by_name(*, control: ModelControl, model_name: str) -> SwitchJobView:
    """Seed 004's load: `model_name` is a model's served name or alias, or a profile id."""
    profile = control.profiles.by_served_name(model_name)
    if profile is None:
        try:
            profile = control.profile(model_name)
        except ProfileNotFound:
            names = sorted({n for p in control.profiles.profiles.values() for n in p.served_names})
            raise GatewayError(
                404,
                f"No model {model_name!r}. Models: {', '.join(names)}.",
                code="model_not_found",
                param="model_name",
            ) from None
    return load(control=control, profile_id=profile.id)


def unload(*, control: ModelControl, profile_id: str) -> SwitchJobView:
    """Drain and stop a profile's engine (a job that succeeds at once when none runs)."""
    _known_profile(control, profile_id)
    try:
        job = control.manager.request_unload(profile_id)
    except EngineBusy as exc:
        raise _busy(str(exc), exc.job_id) from None
    return job_view(job)


def sleep(*, control: ModelControl, profile_id: str, level: int | None) -> SwitchJobView:
    """Drain a serving engine and put it to sleep at `level` (default: its profile's).

    Refused up front rather than left to fail in the job: the fleet stops an engine whose sleep
    fails, and an admin who asked for a sleep did not ask for a stop."""
    profile = _known_profile(control, profile_id)
    _refuse_if_busy(control, profile_id)
    if level is None and profile.sleep_level == 0:
        raise GatewayError(
            409,
            f"Profile {profile_id!r} has no sleep mode (sleep_level 0): give a level, or "
            "unload it instead.",
            code="sleep_not_supported",
            param="level",
        )
    engine = control.manager.engine(profile_id)
    if engine is None or not engine.serves:
        state = "not loaded" if engine is None else engine.state.value
        if engine is not None and engine.status().asleep:
            state = "asleep"
        raise GatewayError(
            409,
            f"The engine of {profile_id!r} is {state}: only a ready engine is put to sleep.",
            code="engine_not_ready",
        )
    if not engine.sleep_capable:
        raise GatewayError(
            409,
            f"The engine of {profile_id!r} does not answer vLLM's sleep routes: unload it instead.",
            code="sleep_not_supported",
        )
    try:
        job = control.manager.request_sleep(profile_id, level)
    except EngineBusy as exc:
        raise _busy(str(exc), exc.job_id) from None
    return job_view(job)


def wake(*, control: ModelControl, profile_id: str) -> SwitchJobView:
    """Wake an engine the fleet put to sleep (started cold when the wake fails)."""
    _known_profile(control, profile_id)
    _refuse_if_busy(control, profile_id)
    engine = control.manager.engine(profile_id)
    if engine is None or engine.state is not EngineState.ASLEEP:
        state = "not loaded" if engine is None else engine.state.value
        raise GatewayError(
            409,
            f"The engine of {profile_id!r} is {state}, not asleep: load it instead.",
            code="not_asleep",
        )
    try:
        job = control.manager.request_wake(profile_id)
    except EngineBusy as exc:
        raise _busy(str(exc), exc.job_id) from None
    return job_view(job)


def get_job(*, control: ModelControl, job_id: str) -> SwitchJobView:
    """A job by id; 404 when unknown."""
    job = control.manager.job(job_id)
    if job is None:
        raise GatewayError(404, f"No job {job_id!r}.", code="job_not_found")
    return job_view(job)


def list_jobs(*, control: ModelControl) -> JobList:
    """The jobs the fleet keeps, newest first."""
    return JobList(jobs=[job_view(job) for job in reversed(control.manager.jobs())])


def _engine_entry(
    *, control: ModelControl, scheduler: Scheduler, engine: ManagedEngine, ledger: Ledger
) -> FleetEngineView:
    manager = control.manager
    profile_id = engine.profile_id
    status = engine.status()
    handle = engine.handle
    try:
        profile: Profile | None = control.profile(profile_id)
    except ProfileNotFound:  # the profiles were reloaded without it
        profile = None
    served = status.served_model_name or (profile.served_model_name if profile else None)
    aliases = [*(profile.aliases if profile else ()), *status.served_names]
    claim = ledger.get(profile_id)
    job = manager.job_for(profile_id)
    return FleetEngineView(
        profile_id=profile_id,
        served_model_name=served,
        aliases=[name for name in dict.fromkeys(aliases) if name != served],
        state=status.state.value,
        node=(handle.node_id if handle is not None else "") or LOCAL_NODE,
        gpu_ids=list(claim.gpu_ids) if claim else [],
        claim_bytes_per_gpu=claim.bytes_per_gpu if claim else 0,
        held_bytes_per_gpu=claim.held_per_gpu if claim else 0,
        in_flight=status.in_flight,
        queued=scheduler.queued_for(profile_id),
        slots=scheduler.slots(profile_id),
        last_used=status.last_used,
        sleep_level=status.sleep_level,
        profile_sleep_level=profile.sleep_level if profile else 0,
        last_load_s=status.last_load_s,
        last_wake_s=status.last_wake_s,
        pinned=profile.pinned if profile else False,
        priority=profile.priority if profile else 0,
        is_default=profile_id == manager.default_profile_id,
        job=job_view(job) if job else None,
        failure=status.failure.value if status.failure else None,
        reason=status.reason,
        error=status.error,
    )


def _gpu_entry(
    gpu: GpuInfo, *, ledger: Ledger, pids: tuple[int, ...], states: dict[str, str]
) -> FleetGpuView:
    # Not ours: what the reading shows used less what our engines' processes use, as placement
    # counts it (orchestrator.placement.not_ours with the fleet's pids), rather than used less
    # the ledger: a recorded snapshot never shows our engines, and its GPUs must still split
    # into others + ours (the ledger) + free.
    others = not_ours(gpu, pids)
    return FleetGpuView(
        index=gpu.index,
        name=gpu.name,
        node=gpu.node,
        total_bytes=gpu.memory_total_bytes,
        used_bytes=gpu.memory_used_bytes,
        not_ours_bytes=others,
        free_bytes=max(0, gpu.memory_total_bytes - others - ledger.held_on(gpu.index)),
        engines=[
            GpuShareView(
                profile_id=claim.engine_id,
                bytes=claim.held_per_gpu,
                state=states.get(claim.engine_id, EngineState.IDLE.value),
            )
            for claim in ledger.claims
            if gpu.index in claim.gpu_ids
        ],
    )


def fleet_view(*, control: ModelControl, scheduler: Scheduler) -> FleetView:
    """Every engine the fleet has run, and each GPU's split between them, others and free."""
    manager = control.manager
    ledger = manager.ledger()
    engines = sorted(manager.engines(), key=lambda e: e.profile_id)
    states = {e.profile_id: e.state.value for e in engines}
    inventory = control.inventory(fresh=True)
    pids = manager.our_pids(inventory)
    return FleetView(
        default_profile=manager.default_profile_id,
        max_engines=manager.max_engines or control.settings.FLEET_MAX_ENGINES,
        engines=[
            _engine_entry(control=control, scheduler=scheduler, engine=e, ledger=ledger)
            for e in engines
        ],
        gpus=[_gpu_entry(g, ledger=ledger, pids=pids, states=states) for g in inventory.gpus],
        role=control.role,
        leader_url=control.leader_url,
        term=control.term,
    )


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
