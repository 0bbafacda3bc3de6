"""Profile + verdict -> EngineSpec: the exact argv, environment, mounts and GPUs."""

from __future__ import annotations

import asyncio
import math
import os
import re
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from orchestrator.gpus import GpuInventory, SnapshotReader
from orchestrator.placement import Ledger, claim_for, place
from orchestrator.planner import FitVerdict, plan_profile
from orchestrator.profiles import Profile, ProfileSet, RuntimeKind, load_profiles
from orchestrator.runtimes import ProcessRuntime
from orchestrator.runtimes.base import LABEL_SERVED_NAME, EngineSpec, RuntimeHandle, engine_key_env
from orchestrator.runtimes.docker import container_kwargs
from orchestrator.runtimes.process import engine_environment
from orchestrator.specs import VLLM_SERVER_MODULE, SpecError, build_engine_spec, placed, vllm_args
from simulator.__main__ import config_from_args
from tests.helpers.paths import REPO
from tests.helpers.ports import free_port

SNAPSHOT = REPO / "tests" / "fixtures" / "gpu" / "dual_rtx3090.json"
VALID = REPO / "tests" / "fixtures" / "profiles" / "valid.yml"
VLLM_PYTHON = "/opt/vllm/bin/python"
GATEWAY_PYTHON = "/opt/gateway/bin/python"
NO_GPU = GpuInventory(gpus=(), source="nvml", reason="NVML unavailable")


@pytest.fixture(scope="module")
def dual_3090() -> GpuInventory:
    """The recorded dual RTX 3090 inventory."""
    return SnapshotReader(SNAPSHOT).read()


@pytest.fixture(scope="module")
def shipped() -> ProfileSet:
    """The shipped model_profiles.yml."""
    return load_profiles(REPO / "model_profiles.yml")


@pytest.fixture(scope="module")
def fixtures() -> ProfileSet:
    """The fixture file: one profile per engine and runtime."""
    return load_profiles(VALID)


def spec_for(
    profile: Profile,
    inventory: GpuInventory,
    *,
    port: int = 8123,
    hf_cache: str | None = "vcg-hf-cache",
    hf_token: str | None = None,
    log_dir: Path | None = None,
) -> EngineSpec:
    """Plan `profile` on `inventory` and build its spec with test settings."""
    return build_engine_spec(
        profile,
        plan_profile(profile, inventory),
        port=port,
        vllm_python=VLLM_PYTHON,
        hf_cache=hf_cache,
        hf_token=hf_token,
        log_dir=log_dir,
        instance="test",
        gateway_python=GATEWAY_PYTHON,
    )


def test_awq_70b_in_docker_gets_the_planned_split_and_context(
    shipped: ProfileSet, dual_3090: GpuInventory
) -> None:
    spec = spec_for(shipped.get("llama-3-70b-awq"), dual_3090)
    assert spec.runtime == "docker"
    assert spec.image == "vllm/vllm-openai:v0.32.0"
    # The image's entrypoint is vLLM's API server: the spec gives its arguments only.
    assert spec.command == (
        "--model", "casperhansen/llama-3-70b-instruct-awq",
        "--served-model-name", "llama-3-70b-awq", "casperhansen/llama-3-70b-instruct-awq",
        "--host", "0.0.0.0", "--port", "8000",
        "--tensor-parallel-size", "2",
        "--max-model-len", "7168",
        "--gpu-memory-utilization", "0.9",
        "--dtype", "float16",
        "--quantization", "awq",
    )  # fmt: skip
    assert spec.port == 8123
    assert spec.container_port == 8000
    assert spec.gpu_ids == (0, 1)
    assert spec.volumes == {"vcg-hf-cache": "/root/.cache/huggingface"}
    assert spec.env["HF_HOME"] == "/root/.cache/huggingface"
    assert "HF_TOKEN" not in spec.env
    assert "HF_HUB_OFFLINE" not in spec.env  # a Hub model, downloaded on first start
    assert "CUDA_VISIBLE_DEVICES" not in spec.env  # docker hands over the GPUs itself
    assert spec.aliases == ("casperhansen/llama-3-70b-instruct-awq",)
    assert spec.startup_timeout_s == 900.0
    assert spec.labels == {LABEL_SERVED_NAME: "llama-3-70b-awq"}
    assert spec.log_path is None


def test_unquantized_model_has_no_quantization_flag(
    shipped: ProfileSet, dual_3090: GpuInventory
) -> None:
    spec = spec_for(shipped.get("qwen2-7b"), dual_3090)
    assert "--quantization" not in spec.command
    assert spec.command[spec.command.index("--served-model-name") + 1 :][:2] == (
        "qwen2-7b",
        "Qwen/Qwen2-7B-Instruct",
    )
    assert spec.command[-2:] == ("--dtype", "bfloat16")
    assert spec.gpu_ids == (1,)


def test_hf_token_is_passed_only_when_given(shipped: ProfileSet, dual_3090: GpuInventory) -> None:
    profile = shipped.get("llama-3-8b")
    assert "HF_TOKEN" not in spec_for(profile, dual_3090, hf_token=None).env
    assert "HF_TOKEN" not in spec_for(profile, dual_3090, hf_token="").env
    assert spec_for(profile, dual_3090, hf_token="hf_abc").env["HF_TOKEN"] == "hf_abc"


def test_tiny_cpu_runs_the_vllm_module_on_loopback(shipped: ProfileSet, tmp_path: Path) -> None:
    spec = spec_for(shipped.get("tiny-cpu"), NO_GPU, hf_cache=None, log_dir=tmp_path)
    assert spec.runtime == "process"
    assert spec.command == (
        VLLM_PYTHON, "-m", "vllm.entrypoints.openai.api_server",
        "--model", str(Path.home() / ".cache" / "vllm-chat-gateway" / "tiny-llama"),
        "--served-model-name", "tiny-llama",
        "--host", "127.0.0.1", "--port", "8123",
        "--tensor-parallel-size", "1",
        "--max-model-len", "256",
        "--dtype", "float32",
        "--enforce-eager",
    )  # fmt: skip
    assert spec.gpu_ids == ()
    assert spec.image is None
    assert spec.volumes == {}
    assert spec.env["VLLM_CPU_KVCACHE_SPACE"] == "1"
    assert spec.env["HF_HUB_OFFLINE"] == "1"  # a local directory: never ask the Hub
    assert "HF_HOME" not in spec.env
    assert "CUDA_VISIBLE_DEVICES" not in spec.env
    assert spec.log_path == tmp_path / "test-tiny-cpu.log"
    assert spec.startup_timeout_s == 300.0


def test_profile_env_sets_the_cpu_kv_cache_and_hf_home_follows_the_cache_path(
    fixtures: ProfileSet,
) -> None:
    spec = spec_for(fixtures.get("cpu-tiny"), NO_GPU, hf_cache="/srv/hf")
    assert spec.env["VLLM_CPU_KVCACHE_SPACE"] == "2"
    assert spec.env["HF_HOME"] == "/srv/hf"
    assert spec.command[spec.command.index("--model") + 1] == str(Path.home() / "models/tiny")


def test_gpu_process_is_limited_to_the_planned_gpus(
    fixtures: ProfileSet, dual_3090: GpuInventory
) -> None:
    spec = spec_for(fixtures.get("small-gpu-process"), dual_3090)
    assert spec.gpu_ids == (0, 1)
    assert spec.env["CUDA_VISIBLE_DEVICES"] == "0,1"
    assert spec.env["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"
    assert spec.command[:3] == (VLLM_PYTHON, "-m", "vllm.entrypoints.openai.api_server")
    assert spec.command[-5:] == (
        "--dtype",
        "auto",
        "--kv-cache-dtype",
        "fp8",
        "--enable-prefix-caching",
    )
    assert spec.volumes == {}  # a process has no mounts


def test_docker_volumes_are_the_hf_cache_and_the_profile_volumes(
    fixtures: ProfileSet, dual_3090: GpuInventory
) -> None:
    spec = spec_for(fixtures.get("small-gpu"), dual_3090, hf_cache="/data/hf")
    assert spec.volumes == {
        "/data/hf": "/root/.cache/huggingface",
        "/srv/chat-templates": "/templates",
    }
    assert spec.env["VLLM_LOGGING_LEVEL"] == "INFO"
    aliases = spec.command[spec.command.index("--served-model-name") + 1 :][:3]
    assert aliases == ("small-gpu", "Qwen/Qwen2-7B-Instruct", "small")


def test_read_only_volumes_reach_the_spec_and_the_hf_cache_stays_writable(
    fixtures: ProfileSet, dual_3090: GpuInventory
) -> None:
    writable = spec_for(fixtures.get("small-gpu"), dual_3090, hf_cache="/data/hf")
    assert writable.read_only_volumes == frozenset()

    profile = fixtures.get("small-gpu").model_copy(
        update={
            "volumes": {"/srv/chat-templates": "/templates", "/srv/models": "/models"},
            "read_only_volumes": ("/srv/models",),
        }
    )
    spec = spec_for(profile, dual_3090, hf_cache="/data/hf")
    assert spec.volumes == {
        "/data/hf": "/root/.cache/huggingface",
        "/srv/chat-templates": "/templates",
        "/srv/models": "/models",
    }
    assert spec.read_only_volumes == frozenset({"/srv/models"})
    # What the Docker runtime asks for: only the listed source is mounted read-only.
    modes = {
        source: mount["mode"]
        for source, mount in container_kwargs(spec, instance="t", gpus_available=False)[
            "volumes"
        ].items()
    }
    assert modes == {"/data/hf": "rw", "/srv/chat-templates": "rw", "/srv/models": "ro"}

    process = spec_for(fixtures.get("cpu-tiny"), NO_GPU)
    assert process.read_only_volumes == frozenset()


def test_simulator_process_serves_its_names(shipped: ProfileSet, fixtures: ProfileSet) -> None:
    spec = spec_for(shipped.get("simulator"), NO_GPU, hf_token="hf_abc")
    assert spec.command == (
        GATEWAY_PYTHON, "-m", "simulator",
        "--host", "127.0.0.1", "--port", "8123",
        "--model", "simulator", "--served-model-name", "simulator",
    )  # fmt: skip
    assert spec.gpu_ids == ()
    assert spec.env == {}  # no HF token or cache for something that loads no model
    assert spec.startup_timeout_s == 60.0
    # What `make run` serves: never the test-only routes that show other users' prompts.
    assert config_from_args(spec.command[3:], env={}).test_routes is False

    aliased = spec_for(fixtures.get("sim"), NO_GPU, port=9001)
    # The simulator's own parser accepts the argv and serves the name and the alias.
    config = config_from_args(aliased.command[3:], env={})
    assert config.port == 9001
    assert config.host == "127.0.0.1"
    assert config.model_names == ("sim", "sim-alias")
    assert config.tokens_per_second == 50.0


def test_simulator_in_docker_listens_on_all_interfaces_inside(fixtures: ProfileSet) -> None:
    spec = spec_for(fixtures.get("sim-docker"), NO_GPU)
    assert spec.command[:3] == ("python3", "-m", "simulator")
    assert spec.command[3:7] == ("--host", "0.0.0.0", "--port", "8000")
    assert spec.port == 8123
    assert spec.image == "vcg-test/busybox:1"
    assert spec.gpu_ids == ()
    assert spec.volumes == {}


def test_every_engine_start_gets_a_new_api_key_kept_out_of_argv_env_and_repr(
    shipped: ProfileSet, fixtures: ProfileSet
) -> None:
    first = spec_for(shipped.get("simulator"), NO_GPU)
    again = spec_for(shipped.get("simulator"), NO_GPU)
    in_docker = spec_for(fixtures.get("sim-docker"), NO_GPU)
    vllm = spec_for(fixtures.get("cpu-tiny"), NO_GPU)
    keys = [spec.api_key for spec in (first, again, in_docker, vllm)]
    assert all(key is not None and len(key) >= 43 for key in keys), keys
    assert len(set(keys)) == len(keys)  # one per start, never reused
    for spec in (first, in_docker, vllm):
        assert spec.api_key is not None
        # Not on the command line (every local user reads argv in `ps`) and not in the spec's
        # env (the runtime adds it for the engine alone); never in a log line of the spec.
        assert not any(spec.api_key in arg for arg in spec.command)
        assert spec.api_key not in spec.env.values()
        assert spec.api_key not in repr(spec)
    # An external engine's key is the gateway's VLLM_API_KEY setting, not made up here.
    assert spec_for(fixtures.get("remote"), NO_GPU).api_key is None


def test_external_profile_is_a_url_only(fixtures: ProfileSet) -> None:
    spec = spec_for(fixtures.get("remote"), NO_GPU)
    assert spec.runtime == "external"
    assert spec.base_url == "http://10.0.0.5:8000/v1"
    assert spec.command == ()
    assert spec.env == {}
    assert spec.port is None
    assert spec.gpu_ids == ()


def test_command_engine_gets_its_port(fixtures: ProfileSet) -> None:
    spec = spec_for(fixtures.get("script"), NO_GPU, port=7777)
    assert spec.command == ("/opt/engine/serve", "--listen", "127.0.0.1:7777")
    assert spec.startup_timeout_s == 300.0


def test_a_profile_that_does_not_fit_is_not_built(
    shipped: ProfileSet, dual_3090: GpuInventory
) -> None:
    with pytest.raises(SpecError, match=r"'llama-3-70b' does not fit: .*weights alone"):
        spec_for(shipped.get("llama-3-70b"), dual_3090)


def test_a_verdict_for_another_profile_is_refused(
    shipped: ProfileSet, dual_3090: GpuInventory
) -> None:
    other: FitVerdict = plan_profile(shipped.get("qwen2-7b"), dual_3090)
    with pytest.raises(SpecError, match="the plan is for 'qwen2-7b', not profile 'llama-3-8b'"):
        build_engine_spec(
            shipped.get("llama-3-8b"),
            other,
            port=8000,
            vllm_python=VLLM_PYTHON,
            hf_cache=None,
            hf_token=None,
            log_dir=None,
            instance="test",
        )


def test_a_port_out_of_range_is_refused(shipped: ProfileSet) -> None:
    with pytest.raises(SpecError, match="port 70000 is not a TCP port"):
        spec_for(shipped.get("simulator"), NO_GPU, port=70000)


def test_vllm_args_follow_the_verdict_not_the_profile(
    shipped: ProfileSet, dual_3090: GpuInventory
) -> None:
    profile = shipped.get("llama-3-70b-awq")
    verdict = plan_profile(profile, dual_3090)
    args = vllm_args(profile, verdict, 8123)
    assert profile.max_model_len == 8192
    assert args[args.index("--max-model-len") + 1] == "7168"


def with_fields(profile: Profile, **fields: Any) -> Profile:
    """`profile` with `fields` changed, validated again as the profiles file would be."""
    return Profile.model_validate(profile.model_dump() | fields)


# What the gateway's own environment may hold: none of it may reach an engine by inheritance.
GATEWAY_ENV = {
    "PATH": "/usr/bin:/bin",
    "VLLM_SERVER_DEV_MODE": "1",
    "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True",
    "PYTORCH_ALLOC_CONF": "expandable_segments:True",
}
ALLOC_CONF = ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_HIP_ALLOC_CONF")


def runtime_env(spec: EngineSpec) -> dict[str, str]:
    """The environment the spec's runtime gives its engine: a process's, started by a gateway
    whose own environment is GATEWAY_ENV, or a container's."""
    if spec.runtime == "docker":
        return dict(container_kwargs(spec, instance="t", gpus_available=True)["environment"])
    return engine_environment({**spec.env, **engine_key_env(spec)}, base=GATEWAY_ENV)


def test_sleep_mode_starts_vllm_with_the_flag_and_dev_mode_for_that_engine_only(
    fixtures: ProfileSet, dual_3090: GpuInventory
) -> None:
    for profile_id in ("small-gpu", "small-gpu-process"):
        plain = fixtures.get(profile_id)
        for level in (1, 2):
            spec = spec_for(with_fields(plain, sleep_level=level), dual_3090)
            assert spec.command.count("--enable-sleep-mode") == 1
            # A field's flag comes before the profile's extra_args, like every other one.
            extra = plain.vllm.extra_args
            assert spec.command[len(spec.command) - len(extra) - 1 :] == (
                "--enable-sleep-mode",
                *extra,
            )
            assert spec.env["VLLM_SERVER_DEV_MODE"] == "1"
            env = runtime_env(spec)
            assert env["VLLM_SERVER_DEV_MODE"] == "1", spec.runtime
            assert not any(name in env for name in ALLOC_CONF), spec.runtime
        # sleep_level 0: no sleep mode, and no dev mode inherited from the gateway either.
        awake = spec_for(plain, dual_3090)
        assert "--enable-sleep-mode" not in awake.command
        for env in (awake.env, runtime_env(awake)):
            assert "VLLM_SERVER_DEV_MODE" not in env, awake.runtime
            assert not any(name in env for name in ALLOC_CONF), awake.runtime


def test_a_simulator_sleeps_without_vllm_flags(fixtures: ProfileSet) -> None:
    # The simulator serves the sleep contract always; vLLM's flag would be an unknown argument.
    spec = spec_for(with_fields(fixtures.get("sim"), sleep_level=2), NO_GPU)
    assert "--enable-sleep-mode" not in spec.command
    assert "VLLM_SERVER_DEV_MODE" not in spec.env
    assert config_from_args(spec.command[3:], env={}).model_names == ("sim", "sim-alias")


def test_a_sleep_mode_spec_is_refused_where_sleep_mode_cannot_work(
    fixtures: ProfileSet, dual_3090: GpuInventory
) -> None:
    # model_copy skips the profile's validation; the spec checks again.
    cpu = fixtures.get("cpu-tiny").model_copy(update={"sleep_level": 1})
    with pytest.raises(SpecError, match=r"profile 'cpu-tiny': sleep_level: .* CUDA-only"):
        spec_for(cpu, NO_GPU)
    expandable = fixtures.get("small-gpu").model_copy(
        update={"sleep_level": 1, "env": {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}}
    )
    with pytest.raises(SpecError, match="env: PYTORCH_CUDA_ALLOC_CONF: expandable_segments"):
        spec_for(expandable, dual_3090)


@pytest.fixture(scope="module")
def vllm_python() -> Path:
    """The vLLM CPU venv's interpreter (skip when not installed)."""
    from tests.helpers.services import ServiceUnavailable
    from tests.helpers.vllm_engine import VLLM_PYTHON, check_vllm_python

    try:
        check_vllm_python(VLLM_PYTHON)
    except ServiceUnavailable as exc:
        if os.environ.get("CI") or os.environ.get("VCG_REQUIRE_ALL") == "1":
            pytest.fail(str(exc), pytrace=False)
        pytest.skip(str(exc))
    return VLLM_PYTHON


@pytest.fixture(scope="module")
def tiny_vllm(vllm_python: Path) -> tuple[Path, Path]:
    """The vLLM CPU venv's interpreter and the tiny model (skip when not installed)."""
    from tests.helpers.vllm_engine import ensure_tiny_model

    return vllm_python, ensure_tiny_model(vllm_python)


@pytest.mark.vllm
def test_the_pinned_image_is_the_vllm_tested_and_it_takes_every_flag_a_spec_gives(
    vllm_python: Path, shipped: ProfileSet, fixtures: ProfileSet, dual_3090: GpuInventory
) -> None:
    installed = subprocess.run(
        [str(vllm_python), "-c", "import vllm.version as v; print(v.__version__)"],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    ).stdout.strip()
    # Every docker vLLM profile in sleep mode that fits here, and a GPU process with extra args.
    specs = [
        spec_for(with_fields(profile, sleep_level=1), dual_3090)
        for profile in shipped.profiles.values()
        if profile.engine.value == "vllm"
        and profile.runtime.value == "docker"
        and plan_profile(profile, dual_3090).fits
    ]
    specs.append(spec_for(with_fields(fixtures.get("small-gpu-process"), sleep_level=2), dual_3090))
    flags = {arg.split("=", 1)[0] for spec in specs for arg in spec.command if arg[:2] == "--"}
    helped = subprocess.run(
        [str(vllm_python), "-m", VLLM_SERVER_MODULE, "--help"],
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
        env={**os.environ, "VLLM_NO_USAGE_STATS": "1"},
    ).stdout
    known = set(re.findall(r"--[a-z0-9][a-z0-9-]*", helped))

    images = {spec.image for spec in specs if spec.image}
    assert images == {f"vllm/vllm-openai:v{installed.split('+')[0]}"}
    assert "--enable-sleep-mode" in flags
    assert flags <= known, sorted(flags - known)


@pytest.mark.vllm
async def test_tiny_cpu_spec_starts_real_vllm(tiny_vllm: tuple[Path, Path], tmp_path: Path) -> None:
    python, model_dir = tiny_vllm
    shipped = load_profiles(REPO / "model_profiles.yml")
    # The shipped profile names ~/.cache/...; the test cache may live elsewhere (VCG_CACHE).
    profile = Profile.model_validate(
        shipped.get("tiny-cpu").model_dump() | {"model": str(model_dir)}
    )
    spec = build_engine_spec(
        profile,
        plan_profile(profile, NO_GPU),
        port=free_port(),
        vllm_python=str(python),
        hf_cache=None,
        hf_token=None,
        log_dir=tmp_path,
        instance="test",
    )
    assert spec.api_key
    runtime = ProcessRuntime()
    handle = await runtime.start(spec)
    try:
        key = {"Authorization": f"Bearer {spec.api_key}"}
        async with httpx.AsyncClient(base_url=handle.base_url, timeout=5.0, headers=key) as client:
            models = await wait_for_models(client, runtime, handle)
        assert [model["id"] for model in models["data"]] == ["tiny-llama"]
        assert models["data"][0]["max_model_len"] == 256
        # vLLM took the key from VLLM_API_KEY, which the runtime set: /v1 is refused without it
        # (or with another), /health stays open.
        async with httpx.AsyncClient(base_url=handle.base_url, timeout=5.0) as bare:
            assert (await bare.get("/v1/models")).status_code == 401
            wrong = {"Authorization": "Bearer not-the-key"}
            assert (await bare.get("/v1/models", headers=wrong)).status_code == 401
            assert (await bare.get("/health")).status_code == 200
    finally:
        await runtime.stop(handle)


async def wait_for_models(
    client: httpx.AsyncClient, runtime: ProcessRuntime, handle: RuntimeHandle
) -> dict[str, Any]:
    """GET /v1/models once the engine answers; fail with its log if it exits or stalls."""
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        if not await runtime.is_running(handle):
            pytest.fail("vLLM exited:\n" + "\n".join(runtime.logs_tail(handle, 40)))
        try:
            response = await client.get("/v1/models")
            if response.status_code == 200:
                body: dict[str, Any] = response.json()
                return body
        except httpx.TransportError:
            pass
        await asyncio.sleep(0.5)
    pytest.fail("vLLM not ready after 240 s:\n" + "\n".join(runtime.logs_tail(handle, 40)))


def test_an_engine_placed_beside_another_gets_its_own_fraction_of_the_gpu(
    shipped: ProfileSet, dual_3090: GpuInventory
) -> None:
    """The fleet's spec: the placement's GPU, TP size and context, and gpu_memory_utilization
    = its claim / the GPU's total (not the profile's 0.9), since two engines share the box."""
    qwen = shipped.get("qwen2-7b").model_copy(update={"runtime": RuntimeKind.PROCESS})
    llama = shipped.get("llama-3-8b").model_copy(update={"runtime": RuntimeKind.PROCESS})
    first = place(qwen, dual_3090, Ledger())
    ledger = Ledger((claim_for(first, qwen, last_used=0.0),))
    second = place(llama, dual_3090, ledger)
    assert (first.gpu_ids, second.gpu_ids) == ((1,), (0,))
    profile, verdict = placed(llama, plan_profile(llama, dual_3090), second)
    spec = build_engine_spec(
        profile,
        verdict,
        port=8124,
        vllm_python=VLLM_PYTHON,
        hf_cache=None,
        hf_token=None,
        log_dir=None,
        instance="test",
        gateway_python=GATEWAY_PYTHON,
    )
    args = list(spec.command)
    fraction = float(args[args.index("--gpu-memory-utilization") + 1])
    assert fraction == second.utilization
    assert fraction < 0.9
    # Rounded up: vLLM never gets less than the claim.
    assert fraction * dual_3090.gpus[0].memory_total_bytes >= second.bytes_per_gpu
    assert args[args.index("--tensor-parallel-size") + 1] == "1"
    assert args[args.index("--max-model-len") + 1] == str(second.max_model_len)
    assert spec.env["CUDA_VISIBLE_DEVICES"] == "0"


def test_a_simulator_placed_as_a_model_is_told_its_claim_and_weights(
    dual_3090: GpuInventory,
) -> None:
    simulator = Profile.model_validate(
        {
            "id": "coder",
            "display_name": "stand-in",
            "engine": "simulator",
            "runtime": "process",
            "served_model_name": "coder",
            "architecture": {
                "params_b": 7.616,
                "layers": 28,
                "attention_heads": 28,
                "kv_heads": 4,
                "head_dim": 128,
                "hidden_size": 3584,
                "max_context": 32768,
            },
            "vllm": {"dtype": "bfloat16", "max_model_len": 8192},
        }
    )
    placement = place(simulator, dual_3090, Ledger())
    profile, verdict = placed(simulator, plan_profile(simulator, dual_3090), placement)
    spec = build_engine_spec(
        profile,
        verdict,
        port=8125,
        vllm_python=VLLM_PYTHON,
        hf_cache=None,
        hf_token=None,
        log_dir=None,
        instance="test",
        gateway_python=GATEWAY_PYTHON,
    )
    args = list(spec.command)
    assert int(args[args.index("--gpu-memory-bytes") + 1]) == placement.bytes_per_gpu
    weights = int(args[args.index("--weights-bytes") + 1])
    assert weights == math.ceil(7.616e9 * 2)
    # The simulator accepts what the fleet gives it.
    config = config_from_args(args[args.index("-m") + 2 :])
    assert config.gpu_memory_bytes == placement.bytes_per_gpu
    assert config.max_model_len == 8192
