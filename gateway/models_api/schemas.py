"""Shapes of the model management API."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

# What a profile id may look like (in a body and in a path): the ids model_profiles.yml allows.
PROFILE_ID_PATTERN = r"^[a-z0-9][a-z0-9._-]{0,63}$"


class SwitchRequest(BaseModel):
    """Make a profile from model_profiles.yml the default model ("current")."""

    model_config = ConfigDict(extra="forbid")

    profile_id: str = Field(min_length=1, max_length=64, pattern=PROFILE_ID_PATTERN)
    exclusive: bool = Field(
        default=False,
        description="Stop every other engine first (one engine at a time). Otherwise the "
        "profile is loaded beside the resident engines, evicting only what it needs.",
    )


class SleepRequest(BaseModel):
    """POST /api/models/{profile_id}/sleep: the sleep level (default: the profile's)."""

    model_config = ConfigDict(extra="forbid")

    level: Literal[1, 2] | None = Field(
        default=None,
        description="1: weights copied to host RAM (fast wake); 2: weights discarded "
        "(reloaded on wake). Absent: the profile's sleep_level.",
    )


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
    """A job of the fleet (switch, load, unload, sleep or wake) and its outcome."""

    job_id: str
    kind: str = Field(description="switch, load, unload, sleep or wake.")
    profile_id: str
    previous_profile_id: str | None
    exclusive: bool = Field(description="A switch that stopped every other engine first.")
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
    node: str = Field(
        default="", description="RAY_ADDRESS set: the Ray node id of the GPU's box; else empty."
    )
    node_index: int | None = Field(
        default=None,
        description="On a Ray cluster: the GPU's index on its node (index is cluster-wide).",
    )


class NodeView(BaseModel):
    """One node of the Ray cluster (RAY_ADDRESS) and what it reads."""

    node_id: str
    address: str
    hostname: str
    gpus: int
    ray_gpus: float = Field(description="The GPUs its `ray start` declared to Ray.")
    source: str
    reason: str | None


class GpuInventoryView(BaseModel):
    """All GPUs, where the reading came from, and why it is empty if it is."""

    count: int
    source: str
    reason: str | None
    driver_version: str | None
    gpus: list[GpuView]
    nodes: list[NodeView] = Field(
        default_factory=list, description="RAY_ADDRESS set: every live node; else empty."
    )


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


class JobList(BaseModel):
    """GET /api/models/jobs: the recent jobs, newest first."""

    jobs: list[SwitchJobView]


class FleetEngineView(BaseModel):
    """One engine of the fleet (admins only: `error` may quote the engine)."""

    profile_id: str
    served_model_name: str | None
    aliases: list[str]
    state: str = Field(
        description="idle, starting, loading, ready, draining, stopping, restarting, failed, "
        "sleeping, asleep or waking."
    )
    node: str = Field(description="Where it runs: its Ray node id, or local (one host).")
    gpu_ids: list[int]
    claim_bytes_per_gpu: int = Field(description="Its budget on each of its GPUs (0: no GPU).")
    held_bytes_per_gpu: int = Field(
        description="What it holds on each of its GPUs now: the budget, or the residual "
        "while asleep (0 when not resident)."
    )
    in_flight: int
    queued: int = Field(description="Requests waiting for this engine.")
    slots: int = Field(description="Requests it serves at once (max_concurrency).")
    last_used: float | None
    sleep_level: int = Field(description="The level it sleeps at (0: awake).")
    profile_sleep_level: int = Field(
        description="The profile's sleep_level: what an eviction or a sleep without a "
        "level uses (0: no sleep mode)."
    )
    last_load_s: float | None = Field(description="Its last cold load, in seconds.")
    last_wake_s: float | None = Field(description="Its last wake, in seconds.")
    pinned: bool
    priority: int
    is_default: bool = Field(description='The engine "current" (or no model) reaches.')
    job: SwitchJobView | None = Field(description="The job acting on it now.")
    failure: str | None
    reason: str | None
    error: str | None


class GpuShareView(BaseModel):
    """What one engine holds on one GPU (the ledger)."""

    profile_id: str
    bytes: int
    state: str


class FleetGpuView(BaseModel):
    """One GPU split between our engines, other users and free memory."""

    index: int
    name: str
    node: str = Field(default="", description="Its Ray node (RAY_ADDRESS set), else empty.")
    total_bytes: int
    used_bytes: int = Field(description="Used, as the GPU reading says.")
    not_ours_bytes: int = Field(
        description="Used by other processes and the driver: used less what our engines' "
        "processes use."
    )
    free_bytes: int = Field(
        description="Left for a new engine before the reserve: total less not ours less "
        "what our engines hold."
    )
    engines: list[GpuShareView]


class FleetView(BaseModel):
    """GET /api/models/engines."""

    default_profile: str | None = Field(description='The profile "current" names.')
    max_engines: int = Field(description="FLEET_MAX_ENGINES: engines awake at once.")
    role: str = Field(
        default="alone",
        description="Gateway replicas (RAY_ADDRESS and PostgreSQL): leader or follower; "
        "alone without replicas.",
    )
    leader_url: str | None = Field(default=None, description="The leading replica's URL.")
    term: int | None = Field(default=None, description="The fencing term, while leading.")
    engines: list[FleetEngineView]
    gpus: list[FleetGpuView]
