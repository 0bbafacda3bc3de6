"""deploy/Dockerfile: multi-stage, non-root, with a health check; checked as far as a machine
without a registry allows.

1. Its instructions, read as Docker reads them: named stages, `COPY --from` pointing at an
   earlier stage, sources that exist and survive the .dockerignore, a numeric non-root USER in
   the final stage with no RUN after it, EXPOSE matching PORT, a HEALTHCHECK, the CLI as CMD.
2. The HEALTHCHECK command itself, run against a real gateway (and a closed port).
3. A real build by the local Docker engine, with the base image swapped for the local busybox
   test image and each RUN replaced by a stub (no pip, no PyPI, no python:3.11-slim here): the
   stages, COPYs, USER, ENV, EXPOSE, HEALTHCHECK and CMD land in an image whose config is read
   back, and a container from it runs as uid 10001.
"""

from __future__ import annotations

import fnmatch
import json
import os
import shlex
import shutil
import subprocess
import sys
import tarfile
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from tests.deploy.grafana import DEPLOY
from tests.helpers.app import make_settings, served_app
from tests.helpers.ports import free_port

if TYPE_CHECKING:
    import docker

REPO = DEPLOY.parent
DOCKERFILE = DEPLOY / "Dockerfile"


@dataclass(frozen=True)
class Instruction:
    """One Dockerfile instruction (continuation lines joined)."""

    keyword: str
    args: str
    stage: int


def parse(text: str) -> list[Instruction]:
    """The instructions, numbered by stage (0-based; -1 before the first FROM)."""
    logical: list[str] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        logical.append(pending + line)
        pending = ""
    assert not pending, "a continuation runs off the end of the file"
    stage = -1
    found = []
    for line in logical:
        keyword, _, args = line.partition(" ")
        keyword = keyword.upper()
        if keyword == "FROM":
            stage += 1
        found.append(Instruction(keyword, args.strip(), stage))
    return found


def _ignored(relative: str, patterns: list[str]) -> bool:
    """The .dockerignore verdict (last matching pattern wins; '!' re-includes)."""
    verdict = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        glob = pattern[1:] if negate else pattern
        glob = glob.removesuffix("/**")
        if (
            fnmatch.fnmatch(relative, glob)
            or fnmatch.fnmatch(relative, glob + "/*")
            or (glob.startswith("**/") and fnmatch.fnmatch(relative.rsplit("/", 1)[-1], glob[3:]))
        ):
            verdict = not negate
    return verdict


def _ignore_patterns() -> list[str]:
    lines = (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def test_stages_user_healthcheck_and_sources() -> None:
    instructions = parse(DOCKERFILE.read_text())
    froms = [i for i in instructions if i.keyword == "FROM"]
    assert len(froms) >= 2, "multi-stage"
    names = [i.args.split()[-1] for i in froms]
    assert all(" AS " in i.args.upper() for i in froms), "every stage is named"
    final = len(froms) - 1
    # The runtime stage starts from the base image, not from the build stage.
    assert froms[-1].args.split()[0] not in names
    for copy in (i for i in instructions if i.keyword == "COPY"):
        parts = shlex.split(copy.args)
        flags = [p for p in parts if p.startswith("--")]
        sources = [p for p in parts if not p.startswith("--")][:-1]
        stage_from = next((f.split("=", 1)[1] for f in flags if f.startswith("--from=")), None)
        if stage_from is not None:
            assert stage_from in names[: copy.stage], f"COPY --from={stage_from}: no such stage"
            continue
        for source in sources:
            assert (REPO / source).exists(), f"COPY source {source} is not in the repository"
            assert not _ignored(source, _ignore_patterns()), f"{source} is excluded"
    in_final = [i for i in instructions if i.stage == final]
    users = [i for i in in_final if i.keyword == "USER"]
    assert users, "the final stage sets USER"
    user = users[-1].args
    uid = user.split(":")[0]
    assert uid.isdigit(), f"USER {user} must be a numeric non-root uid"
    assert int(uid) != 0, f"USER {user} must be a numeric non-root uid"
    last_user = in_final.index(users[-1])
    assert not [i for i in in_final[last_user:] if i.keyword == "RUN"], "RUN after USER"
    health = [i for i in in_final if i.keyword == "HEALTHCHECK"]
    assert len(health) == 1
    assert " CMD " in f" {health[0].args} "
    env = " ".join(i.args for i in in_final if i.keyword == "ENV")
    assert "PORT=8080" in env
    assert "HOST=0.0.0.0" in env
    assert [i.args for i in in_final if i.keyword == "EXPOSE"] == ["8080"]
    cmd = json.loads(next(i.args for i in reversed(in_final) if i.keyword == "CMD"))
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert cmd == ["vllm-gateway", "serve"]
    assert "vllm-gateway" in scripts


def _healthcheck_argv() -> list[str]:
    health = next(i for i in parse(DOCKERFILE.read_text()) if i.keyword == "HEALTHCHECK")
    argv: list[str] = json.loads(health.args.split(" CMD ", 1)[1])
    return argv


async def test_the_healthcheck_command_probes_a_real_gateway(sqlite_url: str) -> None:
    import asyncio

    argv = _healthcheck_argv()
    assert argv[0] == "python"
    command = [sys.executable, *argv[1:]]
    async with served_app(make_settings(DATABASE_URL=sqlite_url)) as (_, base):
        port = base.rsplit(":", 1)[1]
        healthy = await asyncio.to_thread(
            subprocess.run, command, env={**os.environ, "PORT": port}, timeout=30, check=False
        )
    assert healthy.returncode == 0
    closed = await asyncio.to_thread(
        subprocess.run, command, env={**os.environ, "PORT": str(free_port())}, timeout=30,
        check=False, capture_output=True,
    )  # fmt: skip
    assert closed.returncode != 0


def _stub_dockerfile(text: str) -> str:
    """Every RUN becomes a stub that leaves what later steps COPY (no pip without PyPI)."""
    lines, skipping = [], False
    for raw in text.splitlines():
        if skipping:
            skipping = raw.rstrip().endswith("\\")
            continue
        if raw.startswith("RUN "):
            lines.append("RUN mkdir -p /wheels /var/lib/vllm-gateway")
            skipping = raw.rstrip().endswith("\\")
            continue
        lines.append(raw)
    return "\n".join(lines) + "\n"


def _context(tmp_path: Path) -> Path:
    """The files the Dockerfile copies, nothing else (the .dockerignore's intent)."""
    context = tmp_path / "context"
    context.mkdir()
    for instruction in parse(DOCKERFILE.read_text()):
        if instruction.keyword != "COPY" or "--from" in instruction.args:
            continue
        for source in shlex.split(instruction.args)[:-1]:
            origin = REPO / source
            if origin.is_dir():
                shutil.copytree(
                    origin, context / source, ignore=shutil.ignore_patterns("__pycache__")
                )
            else:
                shutil.copy2(origin, context / source)
    (context / "Dockerfile").write_text(_stub_dockerfile(DOCKERFILE.read_text()))
    return context


def test_the_local_docker_engine_builds_the_stages(
    docker_client: docker.DockerClient, test_image: str, tmp_path: Path
) -> None:
    from tests.helpers.docker_engine import test_labels

    tag = f"vcg-test-gateway-image:{os.getpid()}"
    image, _ = docker_client.images.build(
        path=str(_context(tmp_path)),
        dockerfile="Dockerfile",
        buildargs={"PYTHON_IMAGE": test_image},
        tag=tag,
        rm=True,
        forcerm=True,
        labels=test_labels(),
    )
    try:
        config = docker_client.api.inspect_image(image.id)["Config"]
        assert config["User"] == "10001:10001"
        assert config["Cmd"] == ["vllm-gateway", "serve"]
        assert "8080/tcp" in config["ExposedPorts"]
        assert "STATE_DIR=/var/lib/vllm-gateway" in config["Env"]
        health = config["Healthcheck"]
        assert health["Test"][0] == "CMD"
        assert health["Test"][1:] == _healthcheck_argv()
        assert health["Interval"] == 15 * 10**9
        assert health["Retries"] == 3
        # The copied files are where the CLI expects them (alembic.ini in the working dir).
        container = docker_client.containers.create(image.id, ["id", "-u"], labels=test_labels())
        try:
            stream, _ = container.get_archive("/app")
            archive = tmp_path / "app.tar"
            archive.write_bytes(b"".join(stream))
            with tarfile.open(archive) as tar:
                names = set(tar.getnames())
            assert {"app/alembic.ini", "app/model_profiles.yml", "app/alembic/env.py"} <= names
            container.start()
            assert container.wait(timeout=30)["StatusCode"] == 0
            assert container.logs().decode().strip() == "10001"
        finally:
            container.remove(force=True)
    finally:
        docker_client.images.remove(image.id, force=True)


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    """A migrated, empty SQLite database file."""
    from gateway.migrate import upgrade

    url = f"sqlite+aiosqlite:///{tmp_path / 'gateway.db'}"
    upgrade(url)
    return url
