"""Shapes of the model management API."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class SwitchRequest(BaseModel):
    """Switch the served model to a profile from model_profiles.yml."""

    model_config = ConfigDict(extra="forbid")

    profile_id: str = Field(min_length=1, max_length=64, pattern=r"^[a-z0-9][a-z0-9._-]{0,63}$")


class EngineView(BaseModel):
    """The managed engine right now (admins only: `error` and `logs` quote the engine)."""

    profile_id: str | None
    served_model_name: str | None
    served_names: list[str]
    state: str
    since: float
    in_flight: int
    error: str | None = Field(
        description="Why the engine does not serve, in detail (may quote the engine's output)."
    )
    engine_url: str | None
    failure: str | None = Field(
        default=None,
        description="The stable code users and /health/ready see (engine_crashed, "
        "engine_restarting, engine_crash_loop, engine_asleep, ...).",
    )
    reason: str | None = Field(default=None, description="The sentence users see with it.")
    asleep: bool = Field(default=False, description="Ready, but the engine says it is asleep.")
    recent_crashes: int = Field(
        default=0,
        description="Crashes within ENGINE_RESTART_WINDOW_S (a crash loop at more "
        "than restart_limit).",
    )
    restart_limit: int = Field(default=0, description="ENGINE_RESTART_MAX (0: no restarts).")
    restart_window_s: float = Field(default=0.0, description="ENGINE_RESTART_WINDOW_S.")
    restart_at: float | None = Field(
        default=None, description="When the pending restart begins (state restarting)."
    )
    restarts: int = Field(
        default=0, description="Restarts of this profile after a crash since the gateway started."
    )
    logs: list[str] = Field(
        default_factory=list,
        description="The engine's last log lines when it last crashed or failed to start.",
    )


class JobEventView(BaseModel):
    """One progress event of a switch job."""

    state: str
    message: str
    progress: float | None
    at: float


class SwitchJobView(BaseModel):
    """A switch job and its outcome."""

    job_id: str
    profile_id: str
    previous_profile_id: str | None
    status: str
    created_at: float
    finished_at: float | None
    error: str | None
    events: list[JobEventView]
    logs: list[str]


class GpuView(BaseModel):
    """One GPU."""

    index: int
    uuid: str
    name: str
    memory_total_bytes: int
    memory_used_bytes: int
    memory_free_bytes: int
    utilization_percent: int | None
    temperature_c: int | None
    power_draw_w: float | None
    power_limit_w: float | None
    processes: list[dict[str, Any]]


class GpuInventoryView(BaseModel):
    """All GPUs, where the reading came from, and why it is empty if it is."""

    count: int
    source: str
    reason: str | None
    driver_version: str | None
    gpus: list[GpuView]


class ModelStatus(BaseModel):
    """GET /api/models/status."""

    engine: EngineView
    job: SwitchJobView | None
    gpus: GpuInventoryView


class ProfileView(BaseModel):
    """A profile with its fit verdict on this hardware."""

    id: str
    display_name: str
    description: str
    engine: str
    runtime: str
    model: str | None
    served_model_name: str
    aliases: list[str]
    quantization: str
    is_default: bool
    is_active: bool
    verdict: dict[str, Any]


class ProfileList(BaseModel):
    """GET /api/models/profiles."""

    default_profile: str
    active_profile: str | None
    profiles: list[ProfileView]


class ReloadResult(BaseModel):
    """POST /api/models/reload."""

    profiles: int
    default_profile: str
    source: str
