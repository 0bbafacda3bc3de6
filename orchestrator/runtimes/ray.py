"""Engines as detached, named Ray actors on the nodes of a Ray cluster (`RAY_ADDRESS`).

One `EngineActor` per engine, pinned to the node the planner chose (hard node affinity), named
`<instance>.<profile id>` in the gateway's namespace and detached, so it outlives the gateway
that made it and a restarted gateway adopts it by name instead of reloading the model.

The actor starts the engine process on its node, listening on the node's address on a port
free there, with the GPUs the planner chose (`CUDA_VISIBLE_DEVICES`, node-local indices), and
ties the process's life to its own: the child asks the kernel for SIGKILL when the actor's
process dies (`PR_SET_PDEATHSIG`), because a child in its own session outlives a killed actor
otherwise. Ray reaps an actor whose raylet dies, so a lost node takes its engines with it.

Ray's GPU accounting is coarse (whole GPUs, or a fraction of one GPU, which Ray picks); the
fleet's ledger places by bytes on GPUs it chooses. An engine on one GPU asks Ray for its share
of that GPU (its gpu_memory_utilization); an engine on several GPUs holds them whole when it
claims more than half of each, else none (Ray has no fraction of several GPUs). Which GPUs the
engine uses is the planner's choice, set in its environment.

The runtime's calls block on Ray; they run in a thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import math
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, cast

import docker
import docker.errors
import ray
import structlog
from ray.exceptions import GetTimeoutError, RayActorError
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from orchestrator.runtimes.base import (
    LABEL_INSTANCE,
    LABEL_PROFILE,
    EngineSpec,
    RuntimeError_,
    RuntimeHandle,
    engine_key_env,
)
from orchestrator.runtimes.docker import container_kwargs, container_name
from orchestrator.runtimes.process import engine_environment

log = structlog.get_logger(__name__)

NAMESPACE = "vllm-chat-gateway"
# How long Ray may take to schedule an engine actor and the actor to launch its process.
LAUNCH_TIMEOUT_S = 120.0
# How long a liveness call may take before the node's own state decides.
ALIVE_TIMEOUT_S = 5.0
_PR_SET_PDEATHSIG = 1
_DEAD_TAIL_LINES = 50


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() == 1:  # the actor died before the request took effect
        os._exit(1)


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def readdress(command: Sequence[str], old_port: int | None, host: str, port: int) -> list[str]:
    """The engine's argv listening on host:port instead of loopback and the port the spec was
    built with (`--host X`, `--port N`, a bare N, `127.0.0.1:N`)."""
    argv: list[str] = []
    old = str(old_port) if old_port is not None else None
    for arg in command:
        previous = argv[-1] if argv else ""
        if previous == "--host":
            argv.append(host)
        elif previous == "--port" or (old is not None and arg == old):
            argv.append(str(port))
        elif old is not None and f"127.0.0.1:{old}" in arg:
            argv.append(arg.replace(f"127.0.0.1:{old}", f"{host}:{port}"))
        else:
            argv.append(arg)
    return argv


# Run beside a container engine: waits for the actor's process to end (killed, or its node's
# raylet gone) and removes the container, which would outlive it. Started through a launcher
# that exits at once, so that it is nobody's child in the actor's tree: Ray kills the children
# of a worker that exits, and this one must outlive it.
_REAPER = """
import sys, time
import docker
pid, container = sys.argv[1], sys.argv[2]
started = None
while True:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
    except OSError:
        break
    started = started or fields[19]
    if fields[0] in ("Z", "X") or fields[19] != started:
        break  # dead (not yet reaped by its parent), or its pid is another process's now
    time.sleep(0.5)
try:
    docker.from_env().containers.get(container).remove(force=True)
    print("removed", container, flush=True)
except docker.errors.NotFound:
    print("already removed", container, flush=True)
"""
_LAUNCH_REAPER = """
import subprocess, sys
subprocess.Popen(
    [sys.executable, "-c", sys.argv[1], *sys.argv[2:]],
    stdin=subprocess.DEVNULL, stdout=sys.stdout, stderr=sys.stderr, start_new_session=True,
)
"""


@ray.remote(num_cpus=0, max_restarts=0)
class EngineActor:
    """Runs one engine (a process, or a container) on its node and lives exactly as long as
    it should."""

    def __init__(self, record: dict[str, Any]) -> None:
        self._record = dict(record)
        self._process: subprocess.Popen[bytes] | None = None
        self._container: str | None = None
        folder = Path(tempfile.gettempdir()) / "vllm-chat-gateway-engines"
        folder.mkdir(mode=0o700, exist_ok=True)
        self._log_path = folder / f"{record['name']}.log"

    def launch(
        self, host: str, command: list[str], env: dict[str, str], gpu_ids: list[int]
    ) -> dict[str, Any]:
        """Start the engine on `host` (this node's address in the cluster) at a port free
        there; its record (base URL, pid)."""
        port = _free_port(host)
        argv = readdress(command, self._record.get("spec_port"), host, port)
        environment = engine_environment(env)
        if gpu_ids:
            environment["CUDA_VISIBLE_DEVICES"] = ",".join(str(i) for i in gpu_ids)
        with self._log_path.open("wb") as out:
            self._process = subprocess.Popen(
                argv,
                env=environment,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )
        self._record.update(
            base_url=f"http://{host}:{port}",
            pid=self._process.pid,
            node_id=ray.get_runtime_context().get_node_id(),
            gpu_ids=list(gpu_ids),
            ray_gpu_ids=[str(i) for i in ray.get_gpu_ids()],
            started_at=time.time(),
        )
        return dict(self._record)

    def launch_container(self, host: str, spec: EngineSpec, instance: str) -> dict[str, Any]:
        """Start the engine's container through this node's Docker, published on `host` at a
        port free there, with the planner's GPUs of this node; a reaper removes it when this
        actor's process ends."""
        port = _free_port(host)
        placed = replace(spec, port=port, gpu_ids=spec.node_gpu_ids)
        kwargs = container_kwargs(placed, instance=instance, gpus_available=bool(placed.gpu_ids))
        kwargs["ports"] = {f"{spec.container_port}/tcp": (host, port)}
        client = docker.from_env()
        try:
            client.images.get(kwargs["image"])
        except docker.errors.ImageNotFound:
            raise RuntimeError_(
                f"image {kwargs['image']!r} is not present on this node's Docker; pull it there"
            ) from None
        # What an earlier engine of this profile left on this node (its reaper gone too).
        labels = [f"{LABEL_INSTANCE}={instance}", f"{LABEL_PROFILE}={spec.profile_id}"]
        for old in client.containers.list(all=True, filters={"label": labels}):
            old.remove(force=True)
        container = client.containers.create(name=container_name(spec, instance=instance), **kwargs)
        self._container = str(container.id)
        with self._log_path.with_suffix(".reaper.log").open("wb") as out:
            subprocess.run(
                [sys.executable, "-c", _LAUNCH_REAPER, _REAPER, str(os.getpid()), self._container],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                check=True,
                timeout=30,
            )
        container.start()
        self._record.update(
            base_url=f"http://{host}:{port}",
            container=self._container,
            node_id=ray.get_runtime_context().get_node_id(),
            gpu_ids=list(spec.node_gpu_ids),
            ray_gpu_ids=[str(i) for i in ray.get_gpu_ids()],
            started_at=time.time(),
        )
        return dict(self._record)

    def _container_status(self) -> str | None:
        if self._container is None:
            return None
        try:
            return str(docker.from_env().containers.get(self._container).status)
        except docker.errors.NotFound:
            return "removed"

    def record(self) -> dict[str, Any]:
        """What the gateway needs to call and adopt this engine (its key included)."""
        return {**self._record, "running": self.alive()}

    def alive(self) -> bool:
        """Whether the engine (its process, or its container) still runs."""
        if self._container is not None:
            return self._container_status() == "running"
        return self._process is not None and self._process.poll() is None

    def exit_code(self) -> int | None:
        """The engine's exit code once it exited."""
        return None if self._process is None else self._process.poll()

    def fence(self, term: int) -> None:
        """A leader of this term holds the engine now: lower terms may no longer stop it."""
        self._record["term"] = max(int(self._record.get("term", 0)), term)

    def stop(self, timeout_s: float, term: int) -> int | None:
        """SIGTERM the engine's process group, SIGKILL it after `timeout_s`; refused to a
        leader of a lower term than the engine's (a deposed one)."""
        held = int(self._record.get("term", 0))
        if term < held:
            raise PermissionError(f"fenced: term {term} is older than the holder's term {held}")
        if self._container is not None:
            return self._stop_container(timeout_s)
        process = self._process
        if process is None:
            return None
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            return process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(process.pid, signal.SIGKILL)
            return process.wait(timeout=10)

    def _stop_container(self, timeout_s: float) -> int | None:
        assert self._container is not None
        try:
            container = docker.from_env().containers.get(self._container)
        except docker.errors.NotFound:
            return None
        if container.status in ("running", "restarting", "paused"):
            container.stop(timeout=max(0, math.ceil(timeout_s)))
        container.reload()
        code = container.attrs.get("State", {}).get("ExitCode")
        container.remove(force=True)  # its reaper finds it gone when the actor ends
        return int(code) if code is not None else None

    def logs_tail(self, lines: int) -> list[str]:
        """The last lines the engine printed."""
        if self._container is not None:
            try:
                raw = docker.from_env().containers.get(self._container).logs(tail=lines)
            except docker.errors.NotFound:
                return []
            return bytes(raw).decode(errors="replace").splitlines()[-lines:]
        try:
            text = self._log_path.read_bytes()[-max(64 * 1024, lines * 1024) :]
        except OSError:
            return []
        return text.decode(errors="replace").splitlines()[-lines:]


def ray_gpus_for(spec: EngineSpec) -> float:
    """What the engine asks of Ray's GPU accounting (see the module's docstring)."""
    share = spec.gpu_share
    if not spec.node_gpu_ids or share <= 0:
        return 0.0
    if len(spec.node_gpu_ids) == 1:
        return min(1.0, math.ceil(share * 100) / 100)
    return float(len(spec.node_gpu_ids)) if share > 0.5 else 0.0


class RayRuntime:
    """Start, stop, watch and adopt engines as Ray actors (the cluster must be connected).

    Gateway replicas share these engines (`shared`): the cluster's named actors are the engine
    registry every replica reads. Only the leading replica acts on them (`leading`): a
    follower's stop forgets an engine and its start is refused. Each act carries the leader's
    fencing `term`; an engine actor refuses a stop from a lower term than the highest it has
    seen, so a deposed leader that has not noticed yet cannot stop what the new one adopted.
    """

    name = "ray"
    shared = True

    def __init__(self, *, instance: str = "default", namespace: str = NAMESPACE) -> None:
        self._instance = instance
        self._namespace = namespace
        self._actors: dict[str, Any] = {}
        # The last lines of engines found dead, by actor name (until the name is used again).
        self._tails: dict[str, list[str]] = {}
        self.leading = True
        self.term = 0

    def fence(self, term: int) -> None:
        """Lead with this fencing term from now on, and tell every engine actor held."""
        self.term = term
        self.leading = True
        for name, actor in list(self._actors.items()):
            try:
                ray.get(actor.fence.remote(term), timeout=ALIVE_TIMEOUT_S)
            except Exception as exc:  # gone: the next adoption or watchdog round sees it
                log.warning("engine_actor_fence_failed", name=name, reason=str(exc))

    def actor_name(self, profile_id: str) -> str:
        """The engine actor's name: this gateway instance's, then the profile's."""
        return f"{self._instance}.{profile_id}"

    async def start(self, spec: EngineSpec) -> RuntimeHandle:
        """Create the engine's actor on its node and launch the engine there."""
        if not self.leading:
            raise RuntimeError_(
                f"profile {spec.profile_id!r}: this gateway replica follows another; only the "
                "leading replica starts engines"
            )
        if not spec.node_id:
            raise RuntimeError_(f"profile {spec.profile_id!r}: no Ray node was chosen for it")
        return await asyncio.to_thread(self._start, spec)

    def _start(self, spec: EngineSpec) -> RuntimeHandle:
        self._tails.pop(self.actor_name(spec.profile_id), None)
        node_id = spec.node_id or ""
        host = _node_address(node_id)
        if host is None:
            raise RuntimeError_(
                f"profile {spec.profile_id!r}: Ray node {node_id[:12]} is not alive"
            )
        name = self.actor_name(spec.profile_id)
        self._kill_named(name)  # an earlier actor of this name is ours and stale
        record = {
            "name": name,
            "instance": self._instance,
            "profile_id": spec.profile_id,
            "api_key": spec.api_key,
            "spec_port": spec.port,
            "term": self.term,
        }
        pinned = NodeAffinitySchedulingStrategy(node_id=node_id, soft=False)
        actor = EngineActor.options(  # type: ignore[attr-defined]
            max_concurrency=4,  # alive() and logs_tail() answer while stop() waits
            name=name,
            namespace=self._namespace,
            lifetime="detached",
            num_gpus=ray_gpus_for(spec),
            scheduling_strategy=pinned,
        ).remote(record)
        env = {**spec.env, **engine_key_env(spec)}
        launch = (
            actor.launch_container.remote(host, spec, self._instance)
            if spec.node_runtime == "docker"
            else actor.launch.remote(host, list(spec.command), env, list(spec.node_gpu_ids))
        )
        try:
            launched = ray.get(launch, timeout=LAUNCH_TIMEOUT_S)
        except GetTimeoutError:
            with contextlib.suppress(Exception):
                ray.kill(actor)
            raise RuntimeError_(
                f"Ray did not start the engine of {spec.profile_id!r} on node "
                f"{node_id[:12]} within {LAUNCH_TIMEOUT_S:g}s (the node may be gone, or "
                f"its GPUs taken in Ray's accounting: it asked for {ray_gpus_for(spec):g})"
            ) from None
        except Exception as exc:
            with contextlib.suppress(Exception):
                ray.kill(actor)
            raise RuntimeError_(
                f"the engine of {spec.profile_id!r} could not start on node {node_id[:12]}: {exc}"
            ) from exc
        self._actors[name] = actor
        log.info("engine_actor_started", name=name, node=spec.node_id, url=launched["base_url"])
        return _handle(launched)

    def _actor(self, name: str) -> Any:
        actor = self._actors.get(name)
        if actor is None:
            actor = ray.get_actor(name, namespace=self._namespace)
            self._actors[name] = actor
        return actor

    def _kill_named(self, name: str) -> None:
        self._actors.pop(name, None)
        with contextlib.suppress(ValueError):
            actor = ray.get_actor(name, namespace=self._namespace)
            with contextlib.suppress(Exception):
                ray.get(actor.stop.remote(5.0, self.term), timeout=20)
            ray.kill(actor, no_restart=True)

    async def stop(self, handle: RuntimeHandle, *, timeout_s: float = 20.0) -> None:
        """Stop the engine (SIGTERM, SIGKILL after the timeout), then its actor."""
        await asyncio.to_thread(self._stop, handle, timeout_s)

    def _stop(self, handle: RuntimeHandle, timeout_s: float) -> None:
        if not self.leading:
            self._actors.pop(handle.id, None)  # a follower forgets; the leader stops
            return
        try:
            actor = self._actor(handle.id)
        except ValueError:
            self._actors.pop(handle.id, None)
            return  # no such actor: it is gone, and its engine with it
        if handle.node_id and not _node_alive(handle.node_id):
            # Its node is lost: the engine went with it (its actor's death killed it).
            with contextlib.suppress(Exception):
                ray.kill(actor, no_restart=True)
            self._actors.pop(handle.id, None)
            return
        try:
            ray.get(actor.stop.remote(timeout_s, self.term), timeout=timeout_s + 15)
        except RayActorError:
            log.info("engine_actor_already_dead", name=handle.id)  # its engine died with it
        except PermissionError as exc:  # a newer leader holds it: this replica was deposed
            self.leading = False
            raise RuntimeError_(f"engine actor {handle.id} refused the stop: {exc}") from exc
        except GetTimeoutError:
            # Unless its node is lost (the engine went with it), the kill below must end it.
            if not handle.node_id or _node_alive(handle.node_id):
                log.warning("engine_actor_stop_timeout", name=handle.id)
        try:
            ray.kill(actor, no_restart=True)
        except Exception as exc:
            if handle.node_id and _node_alive(handle.node_id):
                raise RuntimeError_(f"engine actor {handle.id} could not be killed: {exc}") from exc
        self._actors.pop(handle.id, None)

    async def is_running(self, handle: RuntimeHandle) -> bool:
        """False once the engine exited, its actor died or its node was lost."""
        return await asyncio.to_thread(self._is_running, handle)

    def _is_running(self, handle: RuntimeHandle) -> bool:
        running = self._alive(handle)
        if not running:
            # Read its last words now, in this thread: logs_tail() is called from the event
            # loop right after, and a lost node would hold it up for the whole read timeout.
            self._tails[handle.id] = self._read_tail(handle, _DEAD_TAIL_LINES, timeout_s=2.0)
        return running

    def _alive(self, handle: RuntimeHandle) -> bool:
        try:
            actor = self._actor(handle.id)
            return bool(ray.get(actor.alive.remote(), timeout=ALIVE_TIMEOUT_S))
        except (RayActorError, ValueError):
            return False
        except Exception:
            # No answer in time (a busy actor, or a node being lost): Ray's view of the node
            # decides, and the engine itself must still answer on its port.
            if handle.node_id and not _node_alive(handle.node_id):
                return False
            return _port_open(handle.base_url)

    def logs_tail(self, handle: RuntimeHandle, lines: int = 50) -> list[str]:
        """The last lines the engine printed (read on its node; for an engine found dead,
        what was read when it was found)."""
        kept = self._tails.get(handle.id)
        if kept is not None:
            return kept[-lines:]
        return self._read_tail(handle, lines, timeout_s=1.0)

    def _read_tail(self, handle: RuntimeHandle, lines: int, *, timeout_s: float) -> list[str]:
        try:
            tail: list[str] = ray.get(
                self._actor(handle.id).logs_tail.remote(lines), timeout=timeout_s
            )
        except Exception as exc:
            return [f"(the engine's log on its node cannot be read: {type(exc).__name__})"]
        return tail

    async def adopt(self) -> list[RuntimeHandle]:
        """This instance's engine actors that still run an engine (after a gateway restart)."""
        return await asyncio.to_thread(self._adopt)

    def _adopt(self) -> list[RuntimeHandle]:
        try:
            named = ray.util.list_named_actors(all_namespaces=True)
        except Exception as exc:
            raise RuntimeError_(f"the Ray cluster cannot be listed: {exc}") from exc
        prefix = f"{self._instance}."
        handles: list[RuntimeHandle] = []
        for entry in named:
            name = str(entry.get("name", ""))
            if entry.get("namespace") != self._namespace or not name.startswith(prefix):
                continue
            try:
                actor = ray.get_actor(name, namespace=self._namespace)
                record = cast(
                    "dict[str, Any]", ray.get(actor.record.remote(), timeout=ALIVE_TIMEOUT_S * 2)
                )
            except Exception as exc:
                log.warning("engine_actor_unreachable", name=name, reason=str(exc))
                continue
            if "base_url" not in record:
                continue  # still launching (a leader's start in progress)
            if not record.get("running"):
                # Its engine exited: the leader removes the remains, a follower leaves them.
                log.info("engine_actor_stale", name=name)
                if self.leading:
                    with contextlib.suppress(Exception):
                        ray.kill(actor, no_restart=True)
                continue
            self._actors[name] = actor
            handles.append(_handle(record))
        return handles


def _handle(record: dict[str, Any]) -> RuntimeHandle:
    return RuntimeHandle(
        runtime="ray",
        id=str(record["name"]),
        base_url=str(record["base_url"]),
        profile_id=str(record["profile_id"]),
        api_key=record.get("api_key"),
        node_id=str(record.get("node_id") or ""),
        node_gpu_ids=tuple(int(i) for i in record.get("gpu_ids", ())),
        pid=int(record["pid"]) if record.get("pid") is not None else None,
    )


def _node_alive(node_id: str) -> bool:
    try:
        nodes: list[dict[str, Any]] = ray.nodes()  # type: ignore[no-untyped-call]
    except Exception:
        return True  # cannot tell: assume it is
    return any(str(n["NodeID"]) == node_id and n.get("Alive") for n in nodes)


def _node_address(node_id: str) -> str | None:
    """The address a live node has in the cluster (what its engines listen on)."""
    nodes: list[dict[str, Any]] = ray.nodes()  # type: ignore[no-untyped-call]
    for node in nodes:
        if str(node["NodeID"]) == node_id and node.get("Alive"):
            return str(node["NodeManagerAddress"])
    return None


def _port_open(base_url: str) -> bool:
    address = base_url.split("://", 1)[-1].rstrip("/")
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=2):
            return True
    except (OSError, ValueError):
        return False
