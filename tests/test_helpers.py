"""The real-service fixtures work: one test each for PostgreSQL, Redis, Docker and vLLM."""

from __future__ import annotations

import gc
import socket
import sys
from collections.abc import Awaitable
from pathlib import Path
from typing import Any, cast

import docker
import httpx
import openai
import pytest
import redis.asyncio as aioredis
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from tests.helpers import docker_engine
from tests.helpers.postgres import PostgresServer
from tests.helpers.simulator_container import run_simulator_container
from tests.helpers.vllm_engine import VLLMEngine


@pytest.mark.postgres
async def test_postgres_url_is_a_fresh_real_database(
    postgres_url: str, postgres_server: PostgresServer
) -> None:
    assert postgres_url.startswith(
        f"postgresql+asyncpg://postgres@127.0.0.1:{postgres_server.port}/"
    )
    engine = create_async_engine(postgres_url)
    try:
        async with engine.begin() as conn:
            tables = (
                await conn.execute(
                    text("SELECT count(*) FROM pg_tables WHERE schemaname = 'public'")
                )
            ).scalar_one()
            assert tables == 0
            await conn.execute(text("CREATE TABLE items (id serial PRIMARY KEY, name text)"))
            await conn.execute(text("INSERT INTO items (name) VALUES (:n)"), {"n": "alpha"})
        async with engine.connect() as conn:
            rows = (await conn.execute(text("SELECT id, name FROM items"))).all()
            assert [tuple(r) for r in rows] == [(1, "alpha")]
            version = (await conn.execute(text("SHOW server_version_num"))).scalar_one()
            assert int(version) >= 150000
    finally:
        await engine.dispose()

    other = postgres_server.create_database("t_other_for_infra_test")
    try:
        assert other != postgres_url
        engine = create_async_engine(other)
        try:
            async with engine.connect() as conn:
                db = (await conn.execute(text("SELECT current_database()"))).scalar_one()
                assert db == "t_other_for_infra_test"
                found = (await conn.execute(text("SELECT to_regclass('public.items')"))).scalar()
                assert found is None  # the table lives only in the first database
        finally:
            await engine.dispose()
    finally:
        postgres_server.drop_database("t_other_for_infra_test")


@pytest.mark.redis
async def test_redis_url_set_get_and_lua(redis_url: str) -> None:
    client: aioredis.Redis = aioredis.Redis.from_url(redis_url, decode_responses=True)
    try:
        assert await client.dbsize() == 0
        await client.set("greeting", "hello")
        assert await client.get("greeting") == "hello"
        script = "return redis.call('INCRBY', KEYS[1], ARGV[1]) * 2"
        # redis-py types eval() as "Awaitable | value" for its sync and async clients alike.
        assert await cast("Awaitable[int]", client.eval(script, 1, "counter", "20")) == 40
        assert await cast("Awaitable[int]", client.eval(script, 1, "counter", "1")) == 42
    finally:
        await client.aclose()


@pytest.mark.docker
@pytest.mark.parametrize("kind", ["missing", "stale"])
def test_the_docker_probe_leaks_no_socket_when_nothing_listens(
    kind: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A fresh machine has no socket, or a dead dockerd's socket file that refuses connections;
    probing either must return None without leaving an unclosed socket behind (the SDK's own
    connect leaks one, which surfaced as an unraisable ResourceWarning in an unrelated test)."""
    path = tmp_path / "docker.sock"
    if kind == "stale":
        bound = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        bound.bind(str(path))
        bound.close()  # the file stays, nothing listens
    monkeypatch.setenv("DOCKER_HOST", f"unix://{path}")
    unraisable: list[Any] = []
    monkeypatch.setattr(sys, "unraisablehook", unraisable.append)
    assert docker_engine._client_if_up() is None
    gc.collect()
    assert [str(u.exc_value) for u in unraisable] == []


def test_simulator_container_serves_models_on_loopback(
    docker_client: docker.DockerClient, test_image: str, repo_root: Path
) -> None:
    container, port = run_simulator_container(
        docker_client, test_image, model="infra-test-model", repo_root=repo_root
    )
    try:
        resp = httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=10)
        assert resp.status_code == 200
        assert [m["id"] for m in resp.json()["data"]] == ["infra-test-model"]

        container.reload()
        host_config = container.attrs["HostConfig"]
        assert host_config["Privileged"] is False
        bindings = host_config["PortBindings"]["8000/tcp"]
        assert [b["HostIp"] for b in bindings] == ["127.0.0.1"]
        published = container.attrs["NetworkSettings"]["Ports"]["8000/tcp"]
        assert {b["HostIp"] for b in published} == {"127.0.0.1"}
        assert container.labels["vcg.test"] == "1"
    finally:
        container.remove(force=True)


@pytest.mark.vllm
async def test_real_vllm_chat_completion_through_openai_sdk(vllm_engine: VLLMEngine) -> None:
    client = openai.AsyncOpenAI(base_url=vllm_engine.base_url, api_key="x", max_retries=0)
    messages: list[openai.types.chat.ChatCompletionMessageParam] = [
        {"role": "user", "content": "Say hello"}
    ]
    try:
        models = await client.models.list()
        assert [m.id for m in models.data] == ["tiny-llama"]

        completion = await client.chat.completions.create(
            model=vllm_engine.model,
            messages=messages,
            max_tokens=8,
            extra_body={"ignore_eos": True},
        )
        assert completion.model == "tiny-llama"
        assert len(completion.choices) == 1
        assert completion.choices[0].message.role == "assistant"
        assert completion.choices[0].finish_reason == "length"
        assert completion.usage is not None
        assert completion.usage.completion_tokens == 8
        assert completion.usage.prompt_tokens > 0
        assert completion.usage.total_tokens == completion.usage.prompt_tokens + 8

        stream = await client.chat.completions.create(
            model=vllm_engine.model,
            messages=messages,
            max_tokens=8,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
        content_deltas = 0
        finish_reasons = []
        usage_chunks = []
        async for chunk in stream:
            assert chunk.model == "tiny-llama"
            if chunk.usage is not None:
                usage_chunks.append(chunk)
            for choice in chunk.choices:
                if choice.delta.content:
                    content_deltas += 1
                if choice.finish_reason:
                    finish_reasons.append(choice.finish_reason)
        assert content_deltas >= 1
        assert finish_reasons == ["length"]
        assert len(usage_chunks) == 1
        final = usage_chunks[0]
        assert final.choices == []
        assert final.usage is not None
        assert final.usage.completion_tokens == 8
    finally:
        await client.close()
