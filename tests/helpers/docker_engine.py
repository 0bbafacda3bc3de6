"""A real Docker engine and a tiny local test image that can run the host's Python.

No registry can be reached from the test machines, so nothing is pulled. ``build_base_image``
imports a minimal root filesystem (a static busybox from Debian's ``busybox-static`` with its
applet links, ``/tmp``, a minimal ``/etc``) as ``vcg-test-base:1``. A container from it runs the
*host's* Python by bind-mounting, read-only and at the same paths:

* ``/usr`` and, where they are real directories, ``/lib`` and ``/lib64`` (the C library and the
  dynamic loader; on merged-/usr hosts they are symlinks into ``/usr``, which the image mirrors),
* the interpreter prefix ``sys.base_prefix`` (here ``/root/.pyenv/versions/3.11.7``),
* the project's ``.venv`` and the repository root.

``python_mounts(repo_root)`` returns these for the docker SDK's ``volumes=`` argument and
``container_python(repo_root)`` the venv interpreter to run, e.g.::

    client.containers.run(image, [container_python(root), "-m", "simulator", ...],
                          volumes=python_mounts(root), working_dir=str(root),
                          environment={"PYTHONPATH": str(root)}, labels=test_labels())
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any, Literal

import docker
from docker.errors import DockerException, ImageNotFound

from orchestrator.runtimes.docker import unix_socket_problem
from tests.helpers.processes import pid_alive
from tests.helpers.services import ServiceUnavailable

BASE_IMAGE = "vcg-test-base:1"
TEST_LABEL = "vcg.test"
PID_LABEL = "vcg.test.pid"
DOCKER_SOCKET = "/var/run/docker.sock"

# Set when this process started dockerd itself (it is left running for later sessions).
dockerd_log: Path | None = None
dockerd_started_in: float | None = None


def test_labels() -> dict[str, str]:
    """Labels for every container a test creates: ``vcg.test=1`` plus the pytest process id, so
    cleanup removes this session's containers and orphans, never a concurrent session's."""
    return {TEST_LABEL: "1", PID_LABEL: str(os.getpid())}


def _client_if_up() -> docker.DockerClient | None:
    client: docker.DockerClient | None = None
    try:
        # The SDK leaks its socket when a unix connect fails (a missing path, or a socket file
        # that dockerd has not started listening on yet): probe such paths ourselves first.
        url = os.environ.get("DOCKER_HOST") or f"unix://{DOCKER_SOCKET}"
        if url.startswith("unix://") and unix_socket_problem(url.removeprefix("unix://")):
            return None
        if os.environ.get("DOCKER_HOST"):
            client = docker.from_env(timeout=60)
        else:
            client = docker.DockerClient(base_url=url, timeout=60)
        client.ping()
        return client
    except (DockerException, OSError):
        # A client whose ping failed still holds a socket: close it (an unclosed socket is a
        # ResourceWarning, an error in this suite).
        if client is not None:
            client.close()
        return None


def ensure_docker(timeout: float = 30) -> docker.DockerClient:
    """A client for a running Docker engine. If none answers on /var/run/docker.sock (or
    ``$DOCKER_HOST``) and we are root with ``dockerd`` installed, start ``dockerd`` in the
    background (log in a temp file; it keeps running after the tests) and wait for it."""
    global dockerd_log, dockerd_started_in

    client = _client_if_up()
    if client is not None:
        return client
    if os.environ.get("DOCKER_HOST"):
        raise ServiceUnavailable(
            f"no Docker engine answers at DOCKER_HOST={os.environ['DOCKER_HOST']}"
        )
    dockerd = shutil.which("dockerd") or shutil.which("dockerd", path="/usr/sbin:/usr/bin")
    if dockerd is None:
        raise ServiceUnavailable(
            "no Docker engine answers on /var/run/docker.sock and dockerd is not installed; "
            "install it with scripts/bootstrap-system.sh (apt-get install docker.io)"
        )
    if os.geteuid() != 0:
        raise ServiceUnavailable(
            "no Docker engine answers on /var/run/docker.sock and only root can start dockerd "
            "here; start the Docker daemon or set DOCKER_HOST"
        )
    t0 = time.monotonic()
    fd, log_name = tempfile.mkstemp(prefix="vcg-dockerd-", suffix=".log")
    log_path = Path(log_name)
    os.close(fd)
    # Started through a shell that backgrounds it and exits: dockerd is then not our child, so
    # no Popen of a still-running process is left to warn (ResourceWarning) at interpreter exit,
    # and it outlives the test session like a system daemon.
    started = subprocess.run(
        ["/bin/sh", "-c", '"$0" >"$1" 2>&1 </dev/null & echo $!', dockerd, str(log_path)],
        capture_output=True,
        text=True,
        check=True,
        timeout=10,
        start_new_session=True,
    )
    pid = int(started.stdout.strip())
    deadline = t0 + timeout
    while True:
        client = _client_if_up()
        if client is not None:
            dockerd_log = log_path
            dockerd_started_in = time.monotonic() - t0
            return client
        if not pid_alive(pid):
            # Another process may have won a race to start dockerd: use it if it answers.
            client = _client_if_up()
            if client is not None:
                return client
            tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-30:])
            raise RuntimeError(f"dockerd (pid {pid}) exited; log {log_path}:\n{tail}")
        if time.monotonic() > deadline:
            tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-30:])
            raise TimeoutError(
                f"dockerd did not answer within {timeout} s; log {log_path}:\n{tail}"
            )
        time.sleep(0.2)


def find_static_busybox() -> Path:
    """A statically linked busybox (Debian's busybox-static); raises ServiceUnavailable."""
    for cand in (os.environ.get("VCG_BUSYBOX"), "/bin/busybox", "/usr/bin/busybox"):
        if not cand or not Path(cand).is_file():
            continue
        if _is_static_elf(Path(cand)):
            return Path(cand)
    raise ServiceUnavailable(
        "no static busybox found (needed to build the Docker test image); install it with "
        "scripts/bootstrap-system.sh (apt-get install busybox-static) or set VCG_BUSYBOX"
    )


def _is_static_elf(path: Path) -> bool:
    """True for an ELF executable without a PT_INTERP segment (no dynamic loader needed)."""
    with path.open("rb") as f:
        head = f.read(64)
        if head[:4] != b"\x7fELF":
            return False
        is64, little = head[4] == 2, head[5] == 1
        order: Literal["little", "big"] = "little" if little else "big"
        if is64:
            phoff = int.from_bytes(head[32:40], order)
            phentsize = int.from_bytes(head[54:56], order)
            phnum = int.from_bytes(head[56:58], order)
        else:
            phoff = int.from_bytes(head[28:32], order)
            phentsize = int.from_bytes(head[42:44], order)
            phnum = int.from_bytes(head[44:46], order)
        f.seek(phoff)
        table = f.read(phentsize * phnum)
    pt_interp = 3
    return all(
        int.from_bytes(table[i * phentsize : i * phentsize + 4], order) != pt_interp
        for i in range(phnum)
    )


def _busybox_applets(busybox: Path) -> list[str]:
    out = subprocess.run(
        [str(busybox), "--list"], capture_output=True, text=True, check=True, timeout=10
    ).stdout
    return [a for a in out.split() if a and "/" not in a and a != "busybox"]


def build_rootfs_tar(busybox: Path) -> bytes:
    """The root filesystem of the base image as an uncompressed tar, built in memory."""
    buf = io.BytesIO()
    now = int(time.time())

    def add_dir(tar: tarfile.TarFile, name: str, mode: int = 0o755) -> None:
        info = tarfile.TarInfo(name)
        info.type, info.mode, info.mtime = tarfile.DIRTYPE, mode, now
        tar.addfile(info)

    def add_file(tar: tarfile.TarFile, name: str, data: bytes, mode: int = 0o644) -> None:
        info = tarfile.TarInfo(name)
        info.size, info.mode, info.mtime = len(data), mode, now
        tar.addfile(info, io.BytesIO(data))

    def add_link(tar: tarfile.TarFile, name: str, target: str) -> None:
        info = tarfile.TarInfo(name)
        info.type, info.linkname, info.mode, info.mtime = tarfile.SYMTYPE, target, 0o777, now
        tar.addfile(info)

    with tarfile.open(fileobj=buf, mode="w") as tar:
        for d in ("bin", "etc", "dev", "proc", "sys", "root", "run", "usr", "var"):
            add_dir(tar, d)
        add_dir(tar, "tmp", 0o1777)
        add_dir(tar, "var/tmp", 0o1777)
        # Mirror the host's /lib* layout: symlinks into /usr stay symlinks (the /usr bind mount
        # makes them resolve), real directories become mount points.
        for name in ("lib", "lib32", "lib64", "libx32", "sbin"):
            host = Path("/") / name
            if host.is_symlink():
                add_link(tar, name, os.readlink(host))
            elif host.is_dir() and name != "sbin":
                add_dir(tar, name)
        if not Path("/sbin").is_symlink():
            add_link(tar, "sbin", "bin")
        add_file(tar, "bin/busybox", busybox.read_bytes(), 0o755)
        for applet in _busybox_applets(busybox):
            add_link(tar, f"bin/{applet}", "busybox")
        add_file(tar, "etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n"
                 b"nobody:x:65534:65534:nobody:/nonexistent:/bin/false\n")  # fmt: skip
        add_file(tar, "etc/group", b"root:x:0:\nnogroup:x:65534:\n")
        add_file(tar, "etc/nsswitch.conf", b"passwd: files\ngroup: files\nhosts: files dns\n")
    return buf.getvalue()


def build_base_image(client: docker.DockerClient, tag: str = BASE_IMAGE) -> str:
    """Import the busybox base image under ``tag`` unless an image with that tag exists."""
    try:
        client.images.get(tag)
        return tag
    except ImageNotFound:
        pass
    repository, _, version = tag.rpartition(":")
    data = build_rootfs_tar(find_static_busybox())
    client.api.import_image_from_data(
        data,
        repository=repository,
        tag=version,
        changes=[
            'CMD ["/bin/sh"]',
            "ENV PATH=/bin:/usr/local/bin:/usr/bin",
            "LABEL vcg.test.image=1",
        ],
    )
    client.images.get(tag)  # raises if the import did not produce the tag
    return tag


def _real_dir(path: Path) -> bool:
    return path.is_dir() and not path.is_symlink()


def venv_dir(repo_root: Path) -> Path:
    """The project's virtualenv: the running interpreter's venv (``sys.prefix``) if it is one,
    else ``repo_root/.venv``."""
    if sys.prefix != sys.base_prefix:
        return Path(sys.prefix)
    return repo_root / ".venv"


def python_mounts(repo_root: Path | str) -> dict[str, dict[str, Any]]:
    """Read-only bind mounts (docker SDK ``volumes=``) that let a container from the base image
    run the host's Python and the project: /usr, real /lib*, the interpreter prefix, the venv
    and the repo root, each at its host path."""
    root = Path(repo_root).resolve()
    paths: list[Path] = [Path("/usr")]
    paths += [p for p in (Path("/lib"), Path("/lib32"), Path("/lib64"), Path("/libx32"))
              if _real_dir(p)]  # fmt: skip
    paths.append(Path(sys.base_prefix).resolve())
    paths.append(venv_dir(root).resolve())
    paths.append(root)
    mounts: dict[str, dict[str, Any]] = {}
    for p in paths:
        # A path already inside another mount (e.g. the prefix under /usr, the venv in the repo)
        # needs no mount of its own.
        if any(p == m or m in p.parents for m in map(Path, mounts)):
            continue
        mounts[str(p)] = {"bind": str(p), "mode": "ro"}
    return mounts


def container_python(repo_root: Path | str) -> str:
    """Path (same inside the container) of the project venv's Python interpreter."""
    return str(venv_dir(Path(repo_root).resolve()) / "bin" / "python")


def remove_test_containers(client: docker.DockerClient, *, only_mine: bool = True) -> int:
    """Remove containers labelled ``vcg.test=1`` that belong to this process, to a process that
    no longer exists, or carry no owner label. Returns how many were removed."""
    removed = 0
    for container in client.containers.list(all=True, filters={"label": f"{TEST_LABEL}=1"}):
        owner = (container.labels or {}).get(PID_LABEL)
        if only_mine and owner and owner != str(os.getpid()) and _owner_alive(owner):
            continue
        try:
            container.remove(force=True)
            removed += 1
        except DockerException:
            pass
    return removed


def _owner_alive(owner: str) -> bool:
    """Whether the process named by a container's owner label still runs."""
    return owner.isdigit() and pid_alive(int(owner))
