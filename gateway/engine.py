"""ModelControl: profiles + GPU inventory + planner + the manager, as the gateway uses them."""

from __future__ import annotations

import dataclasses
import socket
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Protocol, cast

import httpx
from fastapi import Depends, Request

from gateway.logging import get_logger
from gateway.settings import EngineMode, Settings
from orchestrator.gpus import GpuInventory, GpuReader, gpu_reader
from orchestrator.manager import EngineStatus, SwitchJob, VLLMModelManager
from orchestrator.pipeline import plan_cluster
from orchestrator.placement import Placement
from orchestrator.planner import FitVerdict, recommend
from orchestrator.profiles import (
    Engine,
    EngineApi,
    Profile,
    ProfileRegistry,
    ProfileSet,
    RuntimeKind,
    UnknownProfileError,
)
from orchestrator.recovery import RestartPolicy
from orchestrator.runtimes import EngineSpec, ExternalRuntime, ProcessRuntime, Runtime
from orchestrator.runtimes.docker import DockerRuntime
from orchestrator.specs import SpecError, build_engine_spec, placed

if TYPE_CHECKING:
    from orchestrator.cluster import ClusterGpuReader
    from orchestrator.runtimes.ray import RayRuntime

log = get_logger(__name__)

SIMULATOR_PROFILE = "simulator"
EXTERNAL_PROFILE = "external"
# GPU readings are cheap but not free; planning many profiles reuses one reading this long.
_INVENTORY_TTL_S = 2.0


class ProfileNotFound(LookupError):
    """The profile id names no profile; carries the valid ids."""

    def __init__(self, profile_id: str, valid: list[str]) -> None:
        super().__init__(f"no profile {profile_id!r}")
        self.profile_id = profile_id
        self.valid = valid


class ProfileDoesNotFit(Exception):
    """The planner refused the profile on this hardware; carries its verdict."""

    def __init__(self, verdict: FitVerdict) -> None:
        super().__init__(
            f"profile {verdict.profile_id!r} does not fit: {'; '.join(verdict.reasons)}"
        )
        self.verdict = verdict


def host_available_bytes() -> int:
    """MemAvailable from /proc/meminfo (0 when it cannot be read: a level-1 sleep, which
    needs the weights' room in host RAM, is then not chosen)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return 0
    return 0


def free_loopback_port() -> int:
    """Ask the kernel for a free port on 127.0.0.1."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def default_vllm_python() -> str:
    """The vLLM venv the test command builds, if present; else python3 on PATH."""
    cached = Path.home() / ".cache" / "vllm-chat-gateway" / "vllm-venv" / "bin" / "python"
    return str(cached) if cached.exists() else "python3"


def default_llama_cpp_python() -> str:
    """The llama.cpp venv the test command builds, if present; else python3 on PATH."""
    cached = Path.home() / ".cache" / "vllm-chat-gateway" / "llama-cpp-venv" / "bin" / "python"
    return str(cached) if cached.exists() else "python3"


def external_profile(settings: Settings) -> Profile:
    """The engine at VLLM_BASE_URL as a profile (its served names are read from /v1/models)."""
    return Profile(
        id=EXTERNAL_PROFILE,
        display_name="External engine (VLLM_BASE_URL)",
        engine=Engine.EXTERNAL,
        runtime=RuntimeKind.EXTERNAL,
        base_url=settings.VLLM_BASE_URL,
        apis=tuple(EngineApi),  # a vLLM server, by the setting's name
        served_model_name=EXTERNAL_PROFILE,
        startup_timeout_s=settings.ENGINE_STARTUP_TIMEOUT_S or 60.0,
    )


def join_cluster(address: str, instance: str) -> tuple[ClusterGpuReader, RayRuntime]:
    """Join the Ray cluster as a driver: its GPU reader (reading already) and its runtime.
    Ray is imported here, only by a gateway that uses a cluster (it takes a fifth of a second)."""
    from orchestrator.cluster import ClusterGpuReader
    from orchestrator.runtimes.ray import NAMESPACE, RayRuntime

    reader = ClusterGpuReader.connect(address, NAMESPACE)
    reader.start()
    return reader, RayRuntime(instance=instance)


def on_ray_node(spec: EngineSpec, inventory: GpuInventory, share: float) -> EngineSpec:
    """A GPU engine's spec on a Ray cluster: run by the Ray runtime on the node of its GPUs,
    with their indices on that node (the planner keeps an engine's GPUs on one node)."""
    by_index = {gpu.index: gpu for gpu in inventory.gpus}
    gpus = [by_index.get(index) for index in spec.gpu_ids]
    nodes = {gpu.node for gpu in gpus if gpu is not None}
    if None in gpus or len(nodes) != 1:
        raise SpecError(
            f"profile {spec.profile_id!r}: GPUs {list(spec.gpu_ids)} are not on one live node "
            "of the Ray cluster"
        )
    if spec.runtime not in ("process", "docker"):
        raise SpecError(
            f"profile {spec.profile_id!r}: runtime {spec.runtime} cannot run on a Ray node"
        )
    return dataclasses.replace(
        spec,
        runtime="ray",
        node_runtime=spec.runtime,
        node_id=nodes.pop(),
        node_gpu_ids=tuple(gpu.local_index for gpu in gpus if gpu is not None),
        gpu_share=share,
    )


def restart_policy(settings: Settings) -> RestartPolicy:
    """The manager's restart policy from the ENGINE_RESTART_* settings."""
    return RestartPolicy(
        max_restarts=settings.ENGINE_RESTART_MAX,
        window_s=settings.ENGINE_RESTART_WINDOW_S,
        backoff_s=settings.ENGINE_RESTART_BACKOFF_S,
        backoff_max_s=settings.ENGINE_RESTART_BACKOFF_MAX_S,
    )


class ModelControl:
    """What the gateway knows about models: profiles, GPUs, fit, and the engine manager."""

    def __init__(self, settings: Settings, http: httpx.AsyncClient) -> None:
        self.settings = settings
        self.registry = ProfileRegistry(settings.MODEL_PROFILES)
        self.cluster: ClusterGpuReader | None = None
        self._gpus: GpuReader = gpu_reader(settings.GPU_SNAPSHOT)
        self.ray: RayRuntime | None = None
        if settings.RAY_ADDRESS:
            # The gateway joins the cluster as a driver; every node's GPUs are read there.
            self.cluster, self.ray = join_cluster(settings.RAY_ADDRESS, settings.INSTANCE_NAME)
            self._gpus = self.cluster
        self._inventory = self._gpus.read()
        self._inventory_at = time.monotonic()
        self._external = external_profile(settings) if settings.VLLM_BASE_URL else None
        state_dir = settings.STATE_DIR
        self.runtimes: dict[str, Runtime] = {
            "process": ProcessRuntime(
                instance=settings.INSTANCE_NAME, state_dir=state_dir / "engines"
            ),
            "external": ExternalRuntime(),
            "docker": DockerRuntime(
                instance=settings.INSTANCE_NAME, gpus_available=self._inventory.count > 0
            ),
        }
        if self.ray is not None:
            self.runtimes["ray"] = self.ray
        # Gateway replicas (RAY_ADDRESS and PostgreSQL): "leader" or "follower", set by the
        # election; "alone" without replicas. The leader's URL and fencing term.
        self.role = "alone"
        self.term: int | None = None
        self.leader_url: str | None = None
        self.manager = VLLMModelManager(
            http=http,
            runtimes=self.runtimes,
            spec_factory=self.spec_for,
            drain_timeout_s=settings.DRAIN_TIMEOUT_S,
            restart_policy=restart_policy(settings),
            placer=self,
            max_engines=settings.FLEET_MAX_ENGINES,
        )

    # -- reading -----------------------------------------------------------------------------

    @property
    def profiles(self) -> ProfileSet:
        """The profiles in use."""
        return self.registry.current

    def inventory(self, *, fresh: bool = False) -> GpuInventory:
        """The GPU inventory, re-read when older than a couple of seconds."""
        if fresh or time.monotonic() - self._inventory_at > _INVENTORY_TTL_S:
            self._inventory = self._gpus.read()
            self._inventory_at = time.monotonic()
        return self._inventory

    def profile(self, profile_id: str) -> Profile:
        """A profile by id (including the external engine when configured)."""
        if self._external is not None and profile_id == EXTERNAL_PROFILE:
            return self._external
        try:
            return self.profiles.get(profile_id)
        except UnknownProfileError:
            raise ProfileNotFound(profile_id, self.profile_ids()) from None

    def profile_ids(self) -> list[str]:
        """Every valid profile id."""
        ids = list(self.profiles.profiles)
        return [*ids, EXTERNAL_PROFILE] if self._external is not None else ids

    def verdict(self, profile_id: str) -> FitVerdict:
        """The planner's verdict for a profile on this machine's GPUs."""
        return plan_cluster(self.profile(profile_id), self.inventory())

    def verdicts(self) -> dict[str, FitVerdict]:
        """Verdicts for every profile."""
        inventory = self.inventory()
        return {pid: plan_cluster(self.profile(pid), inventory) for pid in self.profile_ids()}

    def recommendations(self) -> list[FitVerdict]:
        """Profiles that fit this hardware, best first."""
        return recommend(self.profiles, self.inventory(), plan_cluster)

    def status(self) -> EngineStatus:
        """The manager's view of the engine."""
        return self.manager.status()

    # -- acting ------------------------------------------------------------------------------

    def spec_for(self, profile_id: str) -> EngineSpec:
        """The spec of a profile run alone: validated profile + fresh plan -> EngineSpec."""
        return self.placed_spec(profile_id, None)

    def placed_spec(self, profile_id: str, placement: Placement | None) -> EngineSpec:
        """The fleet's spec factory: the profile where `placement` puts it beside the resident
        engines (its GPUs, TP size, context and gpu_memory_utilization), or, without one, as
        the planner places it alone."""
        profile = self.profile(profile_id)
        verdict = plan_cluster(profile, self.inventory(fresh=placement is None))
        if placement is not None:
            profile, verdict = placed(profile, verdict, placement)
        elif not verdict.fits:
            raise ProfileDoesNotFit(verdict)
        elif verdict.pipeline_parallel_size > 1:
            raise SpecError(
                f"profile {profile_id!r} is planned across nodes ("
                + "; ".join(verdict.reasons[-1:])
                + "): the gateway does not start engines that span nodes; start it with "
                "vLLM's Ray executor on the cluster and serve it as an external profile (README, "
                "'Add a second box')"
            )
        settings = self.settings
        spec = build_engine_spec(
            profile,
            verdict,
            port=free_loopback_port(),
            vllm_python=settings.VLLM_PYTHON or default_vllm_python(),
            hf_cache=settings.HF_CACHE,
            hf_token=settings.HF_TOKEN.get_secret_value() if settings.HF_TOKEN else None,
            log_dir=settings.STATE_DIR / "logs",
            instance=settings.INSTANCE_NAME,
            llama_cpp_python=settings.LLAMA_CPP_PYTHON or default_llama_cpp_python(),
        )
        if profile.id == EXTERNAL_PROFILE and settings.VLLM_API_KEY is not None:
            spec = dataclasses.replace(spec, api_key=settings.VLLM_API_KEY.get_secret_value())
        if settings.ENGINE_STARTUP_TIMEOUT_S is not None:
            spec = dataclasses.replace(spec, startup_timeout_s=settings.ENGINE_STARTUP_TIMEOUT_S)
        if self.cluster is not None and spec.gpu_ids:
            share = placement.utilization if placement else profile.vllm.gpu_memory_utilization
            spec = on_ray_node(spec, self.inventory(), share)
        elif self.cluster is not None and spec.runtime == "process":
            # No GPU: on this gateway's own node, as an actor too (replicas share it).
            spec = dataclasses.replace(spec, runtime="ray", node_id=self.cluster.own_node_id())
        return spec

    def host_free_bytes(self) -> int:
        """Host RAM available (MemAvailable): a level-1 sleep copies the weights there."""
        return host_available_bytes()

    def check_fits(self, profile_id: str) -> None:
        """Raise ProfileNotFound / ProfileDoesNotFit unless the profile fits the GPUs alone."""
        verdict = plan_cluster(self.profile(profile_id), self.inventory(fresh=True))
        if not verdict.fits:
            raise ProfileDoesNotFit(verdict)

    def switch(self, profile_id: str, *, exclusive: bool = False) -> SwitchJob:
        """Check the profile exists and fits, then start a background switch job."""
        self.check_fits(profile_id)
        return self.manager.request_switch(profile_id, exclusive=exclusive)

    def load(self, profile_id: str) -> SwitchJob:
        """Check the profile exists and fits, then load (or wake) it beside the others."""
        self.check_fits(profile_id)
        return self.manager.request_load(profile_id)

    def reload_profiles(self) -> ProfileSet:
        """Re-read the profiles file; a bad file raises and the old profiles stay."""
        return self.registry.reload()

    def startup_profile(self) -> tuple[str | None, str]:
        """The profile to run at boot (None: no engine), and why.

        ENGINE=auto falls back to the simulator only in development; elsewhere, when the
        default profile does not fit, no engine is started and the reason says why.
        """
        settings = self.settings
        mode = settings.ENGINE
        if mode is EngineMode.NONE:
            return None, "ENGINE=none: no engine is started"
        if mode is EngineMode.EXTERNAL or (mode is EngineMode.AUTO and settings.VLLM_BASE_URL):
            if self._external is None:
                return None, "ENGINE=external but VLLM_BASE_URL is not set"
            return EXTERNAL_PROFILE, "routing to the engine at VLLM_BASE_URL"
        if mode is EngineMode.SIMULATOR:
            return SIMULATOR_PROFILE, "ENGINE=simulator"
        wanted = settings.DEFAULT_PROFILE or self.profiles.default_id
        verdict = self.verdict(wanted)
        if verdict.fits:
            return wanted, f"default profile {wanted}"
        why = "; ".join(verdict.reasons)
        if settings.is_development:
            return (
                SIMULATOR_PROFILE,
                f"{wanted} cannot run here ({why}); running the engine simulator",
            )
        # Outside development the simulator never stands in by surprise: on a GPU host whose
        # GPU reading failed, users would get pseudo-text from a real-looking endpoint.
        return None, (
            f"the default profile {wanted} cannot run here ({why}); the engine simulator "
            "runs only with ENGINE=simulator or ENVIRONMENT=development, so no engine was started"
        )

    def known_spec(self, profile_id: str) -> EngineSpec | None:
        """The spec of a profile an engine found running belongs to; None when it is not one
        of ours any more (unknown, or no longer fits)."""
        try:
            return self.spec_for(profile_id)
        except (ProfileNotFound, ProfileDoesNotFit, ValueError):
            return None

    @property
    def replicated(self) -> bool:
        """Whether gateway replicas share this fleet (a Ray cluster and PostgreSQL)."""
        return self.cluster is not None and not self.settings.is_sqlite

    async def startup(self) -> str:
        """Adopt an engine of ours that still runs, else start the boot profile in background;
        logs what it did (`engine_plan`) and returns it."""

        self.manager.start_watchdog()
        adopted = await self.manager.adopt(self.known_spec)
        if adopted is not None:
            why = f"adopted the running engine of profile {adopted.profile_id}"
            log.info("engine_plan", reason=why)
            return why
        profile_id, why = self.startup_profile()
        if profile_id is not None:
            self.manager.request_switch(profile_id)
        elif self.settings.ENGINE is not EngineMode.NONE:
            # An engine was wanted: keep the reason where health, /v1 errors and the console
            # read the engine's status, so all three say the same thing; the log says it once.
            self.manager.mark_not_started(why)
            log.warning("engine_plan", reason=why)
            return why
        log.info("engine_plan", reason=why)
        return why

    async def aclose(self) -> None:
        """Stop the engines and cancel jobs (replicas leave the engines running for the next
        leader); leave the Ray cluster."""
        await self.manager.aclose(stop_engines=not self.replicated)
        if self.cluster is not None:
            self.cluster.close()
            self.cluster.disconnect()


class EngineResources(Protocol):
    """What the engine's routes read of the app's resources."""

    @property
    def models(self) -> ModelControl:
        """Profiles, GPUs, the planner and the manager."""
        ...


async def get_models(request: Request) -> ModelControl:
    """The app's engine control."""
    return cast(EngineResources, request.app.state.resources).models


ModelsDep = Annotated[ModelControl, Depends(get_models)]
