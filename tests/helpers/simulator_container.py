"""Run the project's vLLM simulator (``python -m simulator``) in a real container.

The container comes from the busybox base image (see ``docker_engine``) and runs the host's
Python from read-only bind mounts. Its port 8000 is published on 127.0.0.1 only; it is never
privileged, drops all capabilities and has a read-only root filesystem (``/tmp`` is a tmpfs).
"""

from __future__ import annotations

import shlex
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import docker
import httpx
from docker.models.containers import Container

from tests.helpers.docker_engine import container_python, python_mounts, test_labels
from tests.helpers.paths import REPO

CONTAINER_PORT = 8000


def published_port(container: Container, container_port: int = CONTAINER_PORT) -> int:
    """The host port Docker published for ``container_port/tcp``."""
    container.reload()
    bindings = container.attrs["NetworkSettings"]["Ports"].get(f"{container_port}/tcp") or []
    for binding in bindings:
        if binding.get("HostIp") in ("127.0.0.1", "") and binding.get("HostPort"):
            return int(binding["HostPort"])
    raise RuntimeError(f"port {container_port}/tcp is not published: {bindings}")


def wait_http_ok(url: str, *, container: Container | None = None, timeout: float = 30.0) -> None:
    """Poll ``url`` until it answers 200; fail early (with the logs) if the container exits."""
    deadline = time.monotonic() + timeout
    last: object = None
    while True:
        try:
            resp = httpx.get(url, timeout=2.0)
            if resp.status_code == 200:
                return
            last = f"HTTP {resp.status_code}"
        except httpx.HTTPError as exc:
            last = exc
        if container is not None:
            container.reload()
            if container.status in ("exited", "dead"):
                logs = container.logs(tail=50).decode(errors="replace")
                raise RuntimeError(f"container {container.name} exited:\n{logs}")
        if time.monotonic() > deadline:
            logs = container.logs(tail=50).decode(errors="replace") if container else ""
            raise TimeoutError(f"{url} not ready after {timeout} s (last: {last})\n{logs}")
        time.sleep(0.1)


def run_simulator_container(
    client: docker.DockerClient,
    image: str,
    *,
    model: str,
    port: int | None = None,
    extra_args: Sequence[str] = (),
    repo_root: Path | str = REPO,
    name: str | None = None,
    environment: dict[str, str] | None = None,
    labels: dict[str, str] | None = None,
    timeout: float = 30.0,
) -> tuple[Container, int]:
    """Start the simulator serving ``model`` in a container and wait for ``/health`` == 200.

    ``port`` is the host port on 127.0.0.1 (None: Docker picks a free one). Returns the container
    and its host port; remove it with ``container.remove(force=True)`` (the ``docker_client``
    fixture also removes every test container at the end of the session).
    """
    root = Path(repo_root).resolve()
    command = [
        container_python(root), "-m", "simulator",
        "--host", "0.0.0.0", "--port", str(CONTAINER_PORT), "--model", model, *extra_args,
    ]  # fmt: skip
    env = {"PYTHONPATH": str(root), "PYTHONDONTWRITEBYTECODE": "1", "PYTHONUNBUFFERED": "1"}
    env.update(environment or {})
    container: Container = client.containers.run(
        image,
        command,
        detach=True,
        name=name,
        ports={f"{CONTAINER_PORT}/tcp": ("127.0.0.1", port)},
        volumes=python_mounts(root),
        working_dir=str(root),
        environment=env,
        labels={**test_labels(), **(labels or {})},
        privileged=False,
        cap_drop=["ALL"],
        security_opt=["no-new-privileges"],
        read_only=True,
        tmpfs={"/tmp": "rw,nosuid,nodev,size=64m"},
    )
    try:
        host_port = published_port(container)
        wait_http_ok(f"http://127.0.0.1:{host_port}/health", container=container, timeout=timeout)
    except BaseException:
        container.remove(force=True)
        raise
    return container, host_port


def simulator_docker_profile(
    image: str, repo_root: Path, profile_id: str, *extra: str
) -> dict[str, Any]:
    """A docker `command` profile running the simulator as `profile_id` on the host's Python.

    PYTHONPATH may not be set by a profile, so a shell changes to the repository root first
    (``python -m`` imports from the working directory) and then becomes the simulator.
    """
    root = str(repo_root.resolve())
    launcher = (
        f'cd {shlex.quote(root)} && exec {shlex.quote(container_python(root))} -m simulator "$@"'
    )
    simulator_args = ["--host", "0.0.0.0", "--port", "{port}", "--model", profile_id, *extra]
    mounts = python_mounts(root)
    return {
        "display_name": f"Simulator {profile_id} in a container",
        "engine": "command",
        "runtime": "docker",
        "image": image,
        "served_model_name": profile_id,
        # `sh -c SCRIPT NAME ARGS...`: ARGS become the simulator's "$@".
        "command": ["sh", "-c", launcher, "sh", *simulator_args],
        "env": {"PYTHONUNBUFFERED": "1", "PYTHONDONTWRITEBYTECODE": "1"},
        "volumes": {host: mount["bind"] for host, mount in mounts.items()},
        "read_only_volumes": list(mounts),
        "startup_timeout_s": 20,
    }
