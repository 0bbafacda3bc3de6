"""Engines as Docker containers (vLLM images), published on 127.0.0.1 only.

The docker SDK blocks, so every call runs in a worker thread. Containers carry labels
(`LABEL_MANAGED`, `LABEL_PROFILE`, `LABEL_INSTANCE`, `LABEL_SERVED_NAME`) so a restarted gateway
can adopt the engine it left running instead of reloading the model.

The engine's API key goes into the container's environment (`VLLM_API_KEY`), never into a label
or the command line. On adoption it is read back from there: that is where the engine itself
reads it, and whoever can inspect the container through the Docker socket can also `docker exec`
into it (the socket is root on the host), so a copy kept elsewhere would hide it from nobody.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import re
import secrets
import socket
import threading
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import docker
import structlog
from docker.errors import APIError, DockerException, ImageNotFound, NotFound
from docker.types import DeviceRequest

from orchestrator.runtimes.base import (
    ENGINE_API_KEY_ENV,
    LABEL_INSTANCE,
    LABEL_MANAGED,
    LABEL_PROFILE,
    LABEL_SERVED_NAME,
    EngineSpec,
    RuntimeError_,
    RuntimeHandle,
    engine_key_env,
)

log = structlog.get_logger(__name__)

_T = TypeVar("_T")

# Lines kept per container for `logs_tail` once the container is gone.
_CACHED_LINES = 500
# Containers whose last lines are kept (the most recent ones).
_CACHED_CONTAINERS = 16
_DEFAULT_DOCKER_HOST = "unix:///var/run/docker.sock"
_NAME_UNSAFE = re.compile(r"[^a-zA-Z0-9_.-]+")


def container_kwargs(spec: EngineSpec, *, instance: str, gpus_available: bool) -> dict[str, Any]:
    """The docker SDK `containers.create(**kwargs)` request for `spec` (everything but the name).

    Pure: tests assert on it, including the GPU request that cannot run on a machine without
    the NVIDIA runtime. The engine port is published on 127.0.0.1 only, so nobody reaches an
    engine around the gateway; the container is never privileged and cannot gain privileges.
    """
    if not spec.image:
        raise RuntimeError_(f"profile {spec.profile_id!r}: docker runtime needs an image")
    volumes = {
        source: {
            "bind": target,
            "mode": "ro"
            if source in spec.read_only_volumes or target in spec.read_only_volumes
            else "rw",
        }
        for source, target in spec.volumes.items()
    }
    kwargs: dict[str, Any] = {
        "image": spec.image,
        # Arguments to the image's entrypoint; none: the image's own CMD.
        "command": list(spec.command) or None,
        # The runtime's API key wins over a profile's env of the same name.
        "environment": {**spec.env, **engine_key_env(spec)},
        "ports": {f"{spec.container_port}/tcp": ("127.0.0.1", spec.port)},
        "volumes": volumes,
        "labels": {
            **spec.labels,
            LABEL_MANAGED: "true",
            LABEL_PROFILE: spec.profile_id,
            LABEL_INSTANCE: instance,
            LABEL_SERVED_NAME: spec.served_model_name,
        },
        "detach": True,
        "privileged": False,
        "security_opt": ["no-new-privileges"],
        # The manager decides about restarts; Docker must not resurrect a stopped engine.
        "restart_policy": {"Name": "no"},
    }
    if spec.ipc_host:
        kwargs["ipc_mode"] = "host"
    else:
        kwargs["shm_size"] = spec.shm_size
    # A GPU request fails outright on a machine without the NVIDIA runtime: only when asked for
    # and available.
    if spec.gpu_ids and gpus_available:
        kwargs["device_requests"] = [
            DeviceRequest(
                driver="nvidia",
                device_ids=[str(i) for i in spec.gpu_ids],
                capabilities=[["gpu"]],
            )
        ]
    return kwargs


def container_name(spec: EngineSpec, *, instance: str) -> str:
    """`vcg-<instance>-<profile_id>-<random>`, reduced to the characters Docker accepts."""
    base = _NAME_UNSAFE.sub("-", f"vcg-{instance}-{spec.profile_id}")
    return f"{base}-{secrets.token_hex(3)}"


class DockerRuntime:
    """Runs each engine as a labelled container from the profile's (locally present) image."""

    name = "docker"

    def __init__(
        self,
        *,
        instance: str,
        client: docker.DockerClient | None = None,
        stop_timeout_s: float = 30.0,
        gpus_available: bool,
    ) -> None:
        self._instance = instance
        self._client: Any = client
        self._owns_client = client is None
        self._client_lock = threading.Lock()
        self._stop_timeout_s = stop_timeout_s
        self._gpus_available = gpus_available
        self._log_cache: OrderedDict[str, list[str]] = OrderedDict()

    @property
    def instance(self) -> str:
        """The gateway instance whose containers this runtime runs and adopts."""
        return self._instance

    # -- protocol ----------------------------------------------------------------------------

    async def start(self, spec: EngineSpec) -> RuntimeHandle:
        """Create and start the container; a previous container of this profile is removed."""
        kwargs = container_kwargs(
            spec, instance=self._instance, gpus_available=self._gpus_available
        )
        launch = asyncio.ensure_future(
            asyncio.to_thread(self._call, self._start_sync, spec, kwargs)
        )
        try:
            return await asyncio.shield(launch)
        except asyncio.CancelledError:
            # The thread goes on after a cancel: wait for it, then remove what it created.
            with contextlib.suppress(Exception):
                handle = await launch
                await asyncio.to_thread(self._call, self._remove_sync, handle.id, 0.0)
            raise

    async def stop(self, handle: RuntimeHandle, *, timeout_s: float | None = None) -> None:
        """SIGTERM, SIGKILL after `timeout_s` (default: the runtime's), then remove the container.

        A container that is already gone is fine.
        """
        timeout = self._stop_timeout_s if timeout_s is None else timeout_s
        await asyncio.to_thread(self._call, self._remove_sync, handle.id, timeout)

    async def is_running(self, handle: RuntimeHandle) -> bool:
        """True while the container's status is `running` (a removed container is not)."""
        return await asyncio.to_thread(self._call, self._is_running_sync, handle.id)

    def logs_tail(self, handle: RuntimeHandle, lines: int = 50) -> list[str]:
        """The container's last output lines; the cached tail once the container is gone."""
        if lines <= 0:
            return []
        if self._client is not None:
            # A container that is gone (or an engine that is down) falls back to the cached tail.
            with contextlib.suppress(DockerException, OSError):
                raw = self._client.api.logs(handle.id, stdout=True, stderr=True, tail=lines)
                return _decode_lines(raw)[-lines:]
        return self._log_cache.get(handle.id, [])[-lines:]

    async def adopt(self) -> list[RuntimeHandle]:
        """Running containers labelled as ours for this instance, with their published port."""
        return await asyncio.to_thread(self._call, self._adopt_sync)

    def close(self) -> None:
        """Close the Docker client if this runtime created it."""
        with self._client_lock:
            if self._owns_client and self._client is not None:
                self._client.close()
                self._client = None

    # -- blocking parts (worker threads) -----------------------------------------------------

    def _docker(self) -> Any:
        with self._client_lock:
            if self._client is None:
                hint = "start the Docker daemon (or set DOCKER_HOST) to run docker profiles"
                url = os.environ.get("DOCKER_HOST") or _DEFAULT_DOCKER_HOST
                # Checked first: the SDK leaks a socket when it cannot connect to a unix path
                # (missing, or a dead daemon's socket file that refuses connections).
                if url.startswith("unix://"):
                    problem = unix_socket_problem(url.removeprefix("unix://"))
                    if problem is not None:
                        raise RuntimeError_(
                            f"no Docker engine is reachable: {url} {problem}; {hint}"
                        )
                try:
                    self._client = docker.from_env()
                except DockerException as exc:
                    raise RuntimeError_(
                        f"no Docker engine is reachable at {url}: {exc}; {hint}"
                    ) from exc
            return self._client

    def _call(self, fn: Callable[..., _T], *args: Any) -> _T:
        """Run `fn` and turn Docker and connection errors into `RuntimeError_`."""
        try:
            return fn(*args)
        except RuntimeError_:
            raise
        except (DockerException, OSError) as exc:
            raise RuntimeError_(f"docker: {exc}") from exc

    def _start_sync(self, spec: EngineSpec, kwargs: dict[str, Any]) -> RuntimeHandle:
        client = self._docker()
        image = kwargs["image"]
        try:
            client.images.get(image)
        except ImageNotFound:
            raise RuntimeError_(
                f"image {image!r} is not present on this Docker engine; pull it first: "
                f"docker pull {image}"
            ) from None
        self._remove_previous(client, spec.profile_id)
        name = container_name(spec, instance=self._instance)
        try:
            container = client.containers.create(name=name, **kwargs)
        except ImageNotFound:
            raise RuntimeError_(f"image {image!r} vanished; pull it: docker pull {image}") from None
        try:
            container.start()
            # The requested port is the published one; reading it back from the container would
            # fail for an engine that already exited, hiding its logs from the manager.
            if spec.port is not None:
                port = spec.port
            else:
                container.reload()
                port = _published_port(container.attrs)
        except (DockerException, OSError, RuntimeError_) as exc:
            with contextlib.suppress(DockerException, OSError):
                container.remove(force=True)
            raise RuntimeError_(f"container {name} did not start: {exc}") from exc
        log.info("docker_engine_started", container=name, image=image, port=port)
        return RuntimeHandle(
            runtime=self.name,
            id=str(container.id),
            base_url=f"http://127.0.0.1:{port}",
            profile_id=spec.profile_id,
            api_key=spec.api_key,
        )

    def _remove_previous(self, client: Any, profile_id: str) -> None:
        """Remove containers this instance left for the same profile (exited, or orphaned)."""
        filters = {
            "label": [
                f"{LABEL_MANAGED}=true",
                f"{LABEL_INSTANCE}={self._instance}",
                f"{LABEL_PROFILE}={profile_id}",
            ]
        }
        for old in client.containers.list(all=True, filters=filters, ignore_removed=True):
            log.info("docker_engine_remove_previous", container=old.name, status=old.status)
            self._remove_sync(str(old.id), self._stop_timeout_s)

    def _remove_sync(self, container_id: str, timeout_s: float) -> None:
        client = self._docker()
        try:
            container = client.containers.get(container_id)
            self._remember_logs(container)
            if container.status in ("running", "restarting", "paused"):
                # Docker's stop: SIGTERM, then SIGKILL after t seconds (whole seconds only).
                container.stop(timeout=max(0, math.ceil(timeout_s)))
            container.remove(force=True)
        except NotFound:
            return
        except APIError as exc:
            # 409: a removal is already in progress, which is what we want.
            if exc.status_code != 409:
                raise

    def _is_running_sync(self, container_id: str) -> bool:
        try:
            container = self._docker().containers.get(container_id)
        except NotFound:
            return False
        if container.status == "running":
            return True
        # Exited (e.g. during startup): keep its last words before anyone removes it.
        self._remember_logs(container)
        return False

    def _adopt_sync(self) -> list[RuntimeHandle]:
        filters = {
            "label": [f"{LABEL_MANAGED}=true", f"{LABEL_INSTANCE}={self._instance}"],
            "status": "running",
        }
        handles: list[RuntimeHandle] = []
        for container in self._docker().containers.list(filters=filters, ignore_removed=True):
            labels: dict[str, str] = container.labels or {}
            try:
                port = _published_port(container.attrs)
            except RuntimeError_ as exc:
                log.warning(
                    "docker_engine_not_adoptable", container=container.name, reason=str(exc)
                )
                continue
            handles.append(
                RuntimeHandle(
                    runtime=self.name,
                    id=str(container.id),
                    base_url=f"http://127.0.0.1:{port}",
                    profile_id=labels.get(LABEL_PROFILE, ""),
                    api_key=_container_api_key(container.attrs),
                )
            )
        return handles

    def _remember_logs(self, container: Any) -> None:
        with contextlib.suppress(DockerException, OSError):
            self._log_cache[str(container.id)] = _decode_lines(container.logs(tail=_CACHED_LINES))
            self._log_cache.move_to_end(str(container.id))
            while len(self._log_cache) > _CACHED_CONTAINERS:
                self._log_cache.popitem(last=False)


def _decode_lines(raw: bytes | str) -> list[str]:
    text = raw.decode(errors="replace") if isinstance(raw, bytes) else raw
    return text.splitlines()


def _published_port(attrs: dict[str, Any]) -> int:
    """The host port (on 127.0.0.1) of the container's one published engine port."""
    requested = attrs.get("HostConfig", {}).get("PortBindings") or {}
    published = attrs.get("NetworkSettings", {}).get("Ports") or {}
    for container_port in requested:
        for binding in published.get(container_port) or []:
            if binding.get("HostIp") == "127.0.0.1" and binding.get("HostPort"):
                return int(binding["HostPort"])
    raise RuntimeError_(f"no port published on 127.0.0.1 (bindings: {published})")


def _container_api_key(attrs: dict[str, Any]) -> str | None:
    """The API key the container's engine was started with (its ENGINE_API_KEY_ENV), if any."""
    prefix = ENGINE_API_KEY_ENV + "="
    for entry in attrs.get("Config", {}).get("Env") or []:
        if isinstance(entry, str) and entry.startswith(prefix):
            return entry.removeprefix(prefix) or None
    return None


def unix_socket_problem(path: str) -> str | None:
    """Why nothing answers on a unix socket path, or None when a connection is accepted."""
    if not Path(path).exists():
        return "does not exist"
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(2.0)
    try:
        probe.connect(path)
    except OSError as exc:
        return f"refuses connections ({exc.strerror or exc})"
    finally:
        probe.close()
    return None
