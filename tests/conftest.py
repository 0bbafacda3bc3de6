"""Session fixtures that start REAL services for the tests: PostgreSQL, Redis, Docker, vLLM (CPU).

Nothing is mocked. Each service runs on 127.0.0.1, on a free port, from a temp dir, and is
started once per session on first use (tests that do not ask for it never pay for it).

Fixtures (names are a contract):

* ``repo_root``        (session) the repository root ``Path``.
* ``postgres_server``  (session) a started ``tests.helpers.postgres.PostgresServer``.
* ``postgres_url``     (function) ``postgresql+asyncpg://`` URL of a new, empty database
                       (dropped after the test).
* ``redis_server``     (session) a started ``tests.helpers.redis.RedisServer``.
* ``redis_url``        (function) its ``redis://127.0.0.1:PORT/0`` URL, after ``FLUSHALL``.
* ``docker_client``    (session) a ``docker.DockerClient`` (dockerd is started if needed); at the
                       end of the session every container labelled ``vcg.test=1`` by this
                       session (or by a dead one) is removed.
* ``test_image``       (session) tag of the busybox base image that runs the host's Python.
* ``vllm_engine``      (session) a started ``tests.helpers.vllm_engine.VLLMEngine`` serving the tiny
                       random-weight Llama as ``tiny-llama``.
* ``llama_cpp_install`` (session) ``(python, gguf)``: the llama.cpp venv's interpreter and the tiny
                       GGUF (``tests.helpers.llama_cpp_engine``; start it with ``LlamaCppEngine``).
* ``node_clients``     (session) a ``tests.helpers.node_clients.NodeClients``: node and the pinned
                       npm SDKs (``openai``, ``@anthropic-ai/sdk``); ``.run(script, env)`` runs an
                       ES module with them and returns the JSON its last line prints.

A missing binary, venv or npm package skips the tests that need it with the reason, except when
``CI`` is set or ``VCG_REQUIRE_ALL=1``: then it fails them (``scripts/test.sh`` sets
VCG_REQUIRE_ALL=1).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn, TypeVar

import pytest

from tests.helpers.paths import REPO
from tests.helpers.services import ServiceUnavailable

if TYPE_CHECKING:
    import docker

    from tests.helpers.node_clients import NodeClients
    from tests.helpers.postgres import PostgresServer
    from tests.helpers.redis import RedisServer
    from tests.helpers.vllm_engine import VLLMEngine

T = TypeVar("T")


def _require_all() -> bool:
    ci = os.environ.get("CI", "").strip().lower()
    return (ci not in ("", "0", "false", "no")) or os.environ.get("VCG_REQUIRE_ALL") == "1"


def _unavailable(reason: str) -> NoReturn:
    if _require_all():
        pytest.fail(f"{reason} (required: CI or VCG_REQUIRE_ALL=1 is set)", pytrace=False)
    pytest.skip(reason)


def _available(make: Callable[[], T]) -> T:
    """Run ``make``; a ServiceUnavailable becomes a skip (or a failure under CI)."""
    try:
        return make()
    except ServiceUnavailable as exc:
        reason = str(exc)
    _unavailable(reason)  # outside the except block: no chained traceback in the report


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


# -- PostgreSQL ------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    from tests.helpers.postgres import PostgresServer

    server = _available(PostgresServer)
    _available(server.start)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def postgres_url(postgres_server: PostgresServer) -> Iterator[str]:
    """A fresh, empty database for this test only."""
    if not postgres_server.is_running():  # a fault test left it paused
        postgres_server.resume()
    name = f"t_{uuid.uuid4().hex[:16]}"
    url = postgres_server.create_database(name)
    yield url
    if postgres_server.is_running():
        postgres_server.drop_database(name)


# -- Redis -----------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    from tests.helpers.redis import RedisServer

    server = _available(RedisServer)
    server.start()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """The session Redis, emptied (FLUSHALL) for this test."""
    import redis

    if not redis_server.is_running():  # a fault test left it stopped
        redis_server.start()
    client = redis.Redis.from_url(redis_server.url)
    try:
        client.flushall()
    finally:
        client.close()
    return redis_server.url


# -- Docker ----------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def docker_client() -> Iterator[docker.DockerClient]:
    from tests.helpers.docker_engine import ensure_docker, remove_test_containers

    client = _available(ensure_docker)
    try:
        yield client
    finally:
        remove_test_containers(client)
        client.close()


@pytest.fixture(scope="session")
def test_image(docker_client: docker.DockerClient) -> str:
    from tests.helpers.docker_engine import build_base_image

    return _available(lambda: build_base_image(docker_client))


# -- vLLM ------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def vllm_engine() -> Iterator[VLLMEngine]:
    from tests.helpers.vllm_engine import (
        VLLM_PYTHON,
        VLLMEngine,
        check_vllm_python,
        ensure_tiny_model,
    )

    _available(lambda: check_vllm_python(VLLM_PYTHON))
    model_dir = ensure_tiny_model(VLLM_PYTHON)
    engine = VLLMEngine(model_dir)
    engine.start()
    try:
        yield engine
    finally:
        engine.stop()


@pytest.fixture(scope="session")
def vllm_install() -> tuple[Path, Path]:
    """The vLLM CPU venv's python and the tiny model dir, for tests that start vLLM themselves."""
    from tests.helpers.vllm_engine import VLLM_PYTHON, check_vllm_python, ensure_tiny_model

    _available(lambda: check_vllm_python(VLLM_PYTHON))
    return VLLM_PYTHON, ensure_tiny_model(VLLM_PYTHON)


# -- llama.cpp -------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def llama_cpp_install() -> tuple[Path, Path]:
    """The llama.cpp venv's python and the tiny GGUF, for tests that start llama.cpp themselves."""
    from tests.helpers.llama_cpp_engine import find_llama_cpp_install

    return _available(find_llama_cpp_install)


# -- Node SDKs -------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def node_clients() -> NodeClients:
    """node and the pinned npm SDKs (VCG_NODE_CLIENTS, else installed by the bootstrap script)."""
    from tests.helpers.node_clients import find_node_clients

    return _available(find_node_clients)
