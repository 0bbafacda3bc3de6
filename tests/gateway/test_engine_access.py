"""Engines the gateway starts: none of its secrets reach them, and only the gateway can call them.

The secrets come from the settings class itself (every `SecretStr` field, every name ending in
_KEY, _TOKEN, _SECRET or _PASSWORD), so a secret added later is covered without editing this
file. Each is set to a canary in this process's environment (the gateway's) and read into the
settings from there; then real engines are started through the gateway's own spec factory and
runtimes, and the environment each engine process really has is read from /proc.
"""

from __future__ import annotations

import asyncio
import dataclasses
import types
import typing
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import docker
import httpx
import pytest
import yaml
from pydantic import SecretStr

from gateway.engine import ModelControl
from gateway.settings import Settings
from tests.helpers import docker_engine
from tests.helpers.profiles import TEST_ROUTES
from tests.helpers.proxy import gateway, gateway_settings
from tests.helpers.simulator_container import simulator_docker_profile

SECRET_SUFFIXES = ("_KEY", "_TOKEN", "_SECRET", "_PASSWORD")
# Settings that are URLs and may carry a password in them: their canary goes in that place.
CREDENTIAL_URLS = {
    "DATABASE_URL": "postgresql://gateway:{canary}@127.0.0.1:1/gateway",
    "REDIS_URL": "redis://:{canary}@127.0.0.1:1/0",
}
# The one gateway secret meant for engines: the Hugging Face token, for engines that download
# weights (vllm and command engines); never for the simulator.
FOR_DOWNLOADING_ENGINES = frozenset({"HF_TOKEN"})


def _types(annotation: Any) -> tuple[Any, ...]:
    """The types an annotation admits (the members of `X | None`, or X itself)."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return typing.get_args(annotation)
    return (annotation,)


def gateway_secret_names() -> list[str]:
    """Every setting that holds a secret, read from the Settings class: the SecretStr fields,
    and text fields named like a secret (CHAT_BYTES_PER_TOKEN is a number, not a token)."""
    return sorted(
        name
        for name, field in Settings.model_fields.items()
        if SecretStr in _types(field.annotation)
        or (name.endswith(SECRET_SUFFIXES) and str in _types(field.annotation))
    )


def test_the_secret_list_is_derived_from_the_settings() -> None:
    names = gateway_secret_names()
    # What the settings hold today; a new secret joins the list by itself.
    expected = {
        "JWT_SECRET", "ADMIN_PASSWORD", "ADMIN_API_KEY", "OPENAI_API_KEY", "VLLM_API_KEY",
        "HF_TOKEN", "METRICS_TOKEN",
    }  # fmt: skip
    assert expected <= set(names), names
    assert "JWT_PRIVATE_KEY_FILE" not in names  # a path, not a secret
    assert "RATE_LIMIT_FREE_TOKENS_PER_MINUTE" not in names
    assert "CHAT_BYTES_PER_TOKEN" not in names  # a number named like a token


@pytest.fixture
def canaries(monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """Each gateway secret set to a distinct canary in the gateway's environment: name -> canary.

    The canary is the value to look for in an engine's environment (for a URL, the password).
    """
    found: dict[str, str] = {}
    for name in [*gateway_secret_names(), *CREDENTIAL_URLS]:
        canary = f"canary{uuid.uuid4().hex}"
        found[name] = canary
        monkeypatch.setenv(name, CREDENTIAL_URLS.get(name, "{canary}").format(canary=canary))
    return found


def _settings_from_environment(tmp_path: Path, profiles: dict[str, Any]) -> Settings:
    """The settings as the gateway reads them: secrets from the environment (the canaries)."""
    path = tmp_path / "model_profiles.yml"
    path.write_text(yaml.safe_dump({"default": next(iter(profiles)), "profiles": profiles}))
    settings = Settings(
        _env_file=None,
        ENVIRONMENT="production",
        ENGINE="none",
        MODEL_PROFILES=path,
        STATE_DIR=tmp_path / "state",
        HF_CACHE=str(tmp_path / "hf"),
        INSTANCE_NAME=f"leak-{uuid.uuid4().hex[:8]}",
        LOG_FORMAT="json",
    )
    return settings


def _leaks(environ: dict[str, str], canaries: dict[str, str], allowed: frozenset[str]) -> list[str]:
    """'VARIABLE carries SETTING' for every canary found in `environ`, except `allowed` settings."""
    return [
        f"{variable} carries {setting}"
        for variable, value in environ.items()
        for setting, canary in canaries.items()
        if canary in value and setting not in allowed
    ]


async def _proc_environ(pid: int) -> dict[str, str]:
    """The environment a process was started with, as the kernel keeps it."""
    path = Path(f"/proc/{pid}/environ")
    raw = b""
    # Empty for a moment right after the spawn, until the kernel has set up the new image.
    for _ in range(500):
        raw = path.read_bytes()
        if raw:
            break
        await asyncio.sleep(0.01)
    pairs = (item.decode().partition("=") for item in raw.split(b"\0") if item)
    return {key: value for key, _, value in pairs}


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    """A plain client (no proxy from the environment) for the manager and direct calls."""
    async with httpx.AsyncClient(trust_env=False) as client:
        yield client


async def test_a_process_engine_gets_no_gateway_secret(
    tmp_path: Path, canaries: dict[str, str], http: httpx.AsyncClient
) -> None:
    profiles = {
        "sim": {"display_name": "Simulator", "engine": "simulator", "runtime": "process",
                "served_model_name": "sim"},
    }  # fmt: skip
    settings = _settings_from_environment(tmp_path, profiles)
    assert settings.VLLM_API_KEY is not None
    assert settings.VLLM_API_KEY.get_secret_value() == canaries["VLLM_API_KEY"]
    control = ModelControl(settings, http)
    try:
        spec = control.spec_for("sim")
        status = await control.manager.start(spec)
        assert status.state.value == "ready", status.error
        handle = control.manager.handle
        assert handle is not None
        environ = await _proc_environ(int(handle.id))
        # Only the runtime's key, never the gateway's (vLLM would take VLLM_API_KEY as its own).
        assert environ["VLLM_API_KEY"] == spec.api_key != canaries["VLLM_API_KEY"]
        assert _leaks(environ, canaries, allowed=frozenset()) == []
        # Reading the environment worked: the allow-listed part of the gateway's is there.
        assert "PATH" in environ

        # Straight to the port: 401 without the key, with the gateway's own VLLM_API_KEY, or any
        # other; the engine's key opens it; /health stays open like vLLM's.
        models = f"{handle.base_url}/v1/models"
        assert (await http.get(models)).status_code == 401
        gateways_key = {"Authorization": f"Bearer {canaries['VLLM_API_KEY']}"}
        assert (await http.get(models, headers=gateways_key)).status_code == 401
        engine_key = {"Authorization": f"Bearer {spec.api_key}"}
        assert (await http.get(models, headers=engine_key)).status_code == 200
        assert (await http.get(f"{handle.base_url}/health")).status_code == 200
    finally:
        await control.aclose()


async def test_a_vllm_process_engine_would_get_only_the_hf_token(
    tmp_path: Path, canaries: dict[str, str], http: httpx.AsyncClient
) -> None:
    """vLLM itself takes ~45 s to start (tests/orchestrator/test_specs.py starts it with its key):
    here, the exact environment the process runtime gives it, from the same spec factory."""
    from orchestrator.runtimes.base import engine_key_env
    from orchestrator.runtimes.process import engine_environment

    profiles = {
        "tiny": {"display_name": "Tiny", "engine": "vllm", "runtime": "process",
                 "served_model_name": "tiny", "model": str(tmp_path / "model"),
                 "vllm": {"device": "cpu", "dtype": "float32", "max_model_len": 256}},
    }  # fmt: skip
    control = ModelControl(_settings_from_environment(tmp_path, profiles), http)
    try:
        spec = control.spec_for("tiny")
        environ = engine_environment({**spec.env, **engine_key_env(spec)})
    finally:
        await control.aclose()
    assert _leaks(environ, canaries, allowed=FOR_DOWNLOADING_ENGINES) == []
    assert environ["HF_TOKEN"] == canaries["HF_TOKEN"]  # passed on purpose: it downloads
    assert environ["VLLM_API_KEY"] == spec.api_key


@pytest.mark.docker
async def test_a_docker_engine_gets_no_gateway_secret(
    tmp_path: Path,
    canaries: dict[str, str],
    http: httpx.AsyncClient,
    docker_client: docker.DockerClient,
    test_image: str,
    repo_root: Path,
) -> None:
    profiles = {"sim-docker": simulator_docker_profile(test_image, repo_root, "sim-docker")}
    control = ModelControl(_settings_from_environment(tmp_path, profiles), http)
    try:
        spec = control.spec_for("sim-docker")
        spec = dataclasses.replace(spec, labels={**spec.labels, **docker_engine.test_labels()})
        status = await control.manager.start(spec)
        assert status.state.value == "ready", (status.error, control.manager.logs_tail(20))
        handle = control.manager.handle
        assert handle is not None
        attrs = docker_client.api.inspect_container(handle.id)
        # The engine process in the container, read from the host's /proc.
        environ = await _proc_environ(int(attrs["State"]["Pid"]))
        assert environ["VLLM_API_KEY"] == spec.api_key != canaries["VLLM_API_KEY"]
        # A command engine may download weights: the HF token is the one secret it gets.
        assert _leaks(environ, canaries, allowed=FOR_DOWNLOADING_ENGINES) == []
        assert environ["HF_TOKEN"] == canaries["HF_TOKEN"]
        labels = attrs["Config"]["Labels"]
        assert not _leaks(labels, {**canaries, "engine key": str(spec.api_key)}, frozenset())
        # Published on the host's loopback only.
        bindings = attrs["HostConfig"]["PortBindings"]
        assert bindings == {"8000/tcp": [{"HostIp": "127.0.0.1", "HostPort": str(spec.port)}]}
        assert (await http.get(f"{handle.base_url}/v1/models")).status_code == 401
    finally:
        await control.aclose()


async def test_only_the_gateway_can_use_the_engine_it_started() -> None:
    # With its test routes: the test reads the engine's own counters (the embedded default
    # never has them).
    profiles = {
        "sim": {"display_name": "Simulator", "engine": "simulator", "runtime": "process",
                "served_model_name": "sim", "vllm": {"extra_args": [TEST_ROUTES]}},
    }  # fmt: skip
    async with gateway(gateway_settings(profiles, "sim")) as gw:
        engine_url = await gw.wait_ready()
        body = {"model": "sim", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}
        async with httpx.AsyncClient(base_url=engine_url, trust_env=False) as direct:
            refused = await direct.post("/v1/chat/completions", json=body)
            assert refused.status_code == 401
            assert (await direct.get("/simulator/requests")).status_code == 401
        # Through the gateway: plain and streamed.
        async with gw.sdk() as sdk:
            completion = await sdk.chat.completions.create(
                model="sim", messages=[{"role": "user", "content": "hi"}], max_tokens=5
            )
            assert completion.choices[0].message.content
            stream = await sdk.chat.completions.create(
                model="sim", messages=[{"role": "user", "content": "hi"}], max_tokens=5,
                stream=True, stream_options={"include_usage": True},
            )  # fmt: skip
            chunks = [chunk async for chunk in stream]
        usage = [chunk.usage for chunk in chunks if chunk.usage is not None]
        assert usage
        assert usage[-1].completion_tokens == 5
        # The engine refused both direct calls itself, and served the gateway's two.
        stats = await gw.sim_stats()
        assert stats["rejected_total"] == 2
        assert stats["requests_total"] == 2
