"""llama.cpp engines from profile to argv: validation, sizing of GGUF files (the planner and the
fleet's placement, partial offload included) and the servers' command lines and environment."""

from __future__ import annotations

import json
import re
import subprocess
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from orchestrator.gpus import GpuInventory, inventory_from_dict
from orchestrator.placement import Claim, Ledger, place
from orchestrator.planner import Fit, plan_profile
from orchestrator.profiles import Engine, Profile, ProfileError, load_profiles
from orchestrator.specs import build_engine_spec, placed
from tests.helpers.paths import REPO

SNAPSHOT = REPO / "tests" / "fixtures" / "gpu" / "dual_rtx3090.json"
SHIPPED = load_profiles(REPO / "model_profiles.yml")
GB = 10**9
GIB = 1024**3


@pytest.fixture(scope="module")
def dual_3090() -> GpuInventory:
    return inventory_from_dict(json.loads(SNAPSHOT.read_text()), source=str(SNAPSHOT))


def _profile(**fields: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "display_name": "GGUF",
        "engine": "llama_cpp",
        "runtime": "docker",
        "image": "ghcr.io/ggml-org/llama.cpp:server-cuda12-b9603",
        "model": "bartowski/Meta-Llama-3-8B-Instruct-GGUF",
        "served_model_name": "gguf",
        "llama_cpp": {"gguf_file": "Meta-Llama-3-8B-Instruct-Q4_K_M.gguf", "gguf_type": "Q4_K_M"},
        "architecture": SHIPPED.get("llama3-8b").architecture.model_dump(),  # type: ignore[union-attr]
    }
    base.update(fields)
    return base


def _load(tmp_path: Path, profile: dict[str, Any]) -> Profile:
    path = tmp_path / "profiles.yml"
    path.write_text(json.dumps({"default": "p", "profiles": {"p": profile}}))
    return load_profiles(path).get("p")


def _refused(tmp_path: Path, profile: dict[str, Any]) -> str:
    with pytest.raises(ProfileError) as caught:
        _load(tmp_path, profile)
    return str(caught.value)


# -- validation ----------------------------------------------------------------------------------


def test_the_shipped_gguf_profiles_are_llama_cpp_with_pinned_images() -> None:
    for pid in ("qwen2.5-7b-gguf", "llama3-8b", "deepseek-r1-distill-14b-gguf"):
        profile = SHIPPED.get(pid)
        assert profile.engine is Engine.LLAMA_CPP
        assert profile.image is not None
        assert "-b" in profile.image.rsplit(":", 1)[1]  # a build number, never latest
        assert profile.llama_cpp.gguf_file is not None
        assert profile.llama_cpp.gguf_file.endswith("Q4_K_M.gguf")
        assert profile.llama_cpp.gguf_type == "Q4_K_M"
        assert profile.sleep_level == 0
    tiny = SHIPPED.get("tiny-gguf")
    assert tiny.runtime.value == "process"
    assert tiny.uses_gpu is False


@pytest.mark.parametrize(
    ("change", "named"),
    [
        ({"llama_cpp": {"gguf_type": "Q4_K_M"}}, "llama_cpp.gguf_file: required"),
        ({"model": "/models/llama.bin"}, "the .gguf file's path"),
        (
            {"llama_cpp": {"gguf_file": "x.gguf", "extra_args": ["--port=9"]}},
            "--port is set through the gateway",
        ),
        (
            {"llama_cpp": {"gguf_file": "x.gguf", "extra_args": ["-ngl", "99"]}},
            "-ngl is set through llama_cpp.n_gpu_layers",
        ),
        (
            {"llama_cpp": {"gguf_file": "x.gguf", "extra_args": ["--api-key", "k"]}},
            "--api-key is set through the gateway",
        ),
        ({"vllm": {"dtype": "float16"}}, "engine llama_cpp takes llama_cpp arguments"),
        ({"sleep_level": 1}, "only vllm and simulator engines have a sleep mode"),
        ({"env": {"HOST": "0.0.0.0"}}, "env: HOST is the gateway's"),
        ({"env": {"LLAMA_API_KEY": "k"}}, "env: LLAMA_API_KEY is the gateway's"),
        ({"llama_cpp": {"gguf_file": "../../etc/passwd"}}, "gguf_file"),
    ],
)
def test_bad_llama_cpp_profiles_are_refused_naming_the_field(
    tmp_path: Path, change: dict[str, Any], named: str
) -> None:
    assert named in _refused(tmp_path, _profile(**change))


def test_llama_cpp_arguments_belong_to_llama_cpp_engines(tmp_path: Path) -> None:
    vllm = {
        "display_name": "v",
        "engine": "vllm",
        "runtime": "process",
        "model": "org/model",
        "served_model_name": "v",
        "vllm": {"device": "cpu"},
        "llama_cpp": {"parallel": 2},
    }
    assert "only engine llama_cpp takes llama_cpp arguments" in _refused(tmp_path, vllm)


# -- sizing --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("pid", "file_gb"),
    [("qwen2.5-7b-gguf", 4.68), ("llama3-8b", 4.92), ("deepseek-r1-distill-14b-gguf", 8.99)],
)
def test_q4_k_m_estimates_are_the_hubs_file_sizes_and_fit_one_3090(
    dual_3090: GpuInventory, pid: str, file_gb: float
) -> None:
    verdict = plan_profile(SHIPPED.get(pid), dual_3090)
    assert verdict.fit is Fit.FITS
    assert len(verdict.gpu_ids) == 1
    assert verdict.gpu_layers is None  # the whole model on the GPU
    assert abs(verdict.weights_bytes / GB - file_gb) / file_gb < 0.02
    # llama.cpp's overhead, not vLLM's 2 GiB of profiling and graphs
    assert verdict.overhead_bytes == GIB


def test_a_model_too_big_for_the_gpus_is_partly_offloaded(dual_3090: GpuInventory) -> None:
    profile = SHIPPED.get("deepseek-r1-distill-14b-gguf")
    arch = profile.architecture
    assert arch is not None
    big = profile.model_copy(update={"architecture": arch.model_copy(update={"params_b": 72.0})})
    verdict = plan_profile(big, dual_3090)
    assert verdict.fit is Fit.FITS
    assert verdict.gpu_ids == (0, 1)
    assert verdict.gpu_layers is not None
    assert 0 < verdict.gpu_layers < arch.layers
    assert "partial offload" in verdict.reasons[-1]
    assert f"{verdict.gpu_layers} of {arch.layers} layers" in verdict.reasons[-1]
    assert verdict.per_gpu_required_bytes <= verdict.per_gpu_budget_bytes
    spec = build_engine_spec(
        big, verdict, port=9000, vllm_python="v", hf_cache="/hf", hf_token=None,
        log_dir=None, instance="t",
    )  # fmt: skip
    command = list(spec.command)
    assert command[command.index("--n-gpu-layers") + 1] == str(verdict.gpu_layers)
    assert command[command.index("--tensor-split") + 1] == "1,1"


def test_the_fleet_places_a_gguf_model_beside_a_resident_engine(dual_3090: GpuInventory) -> None:
    # Something resident on GPU 1 leaves GPU 0 the roomiest.
    ledger = Ledger().with_claim(Claim(engine_id="other", gpu_ids=(1,), bytes_per_gpu=20 * GIB))
    placement = place(SHIPPED.get("llama3-8b"), dual_3090, ledger)
    assert placement.placed
    assert placement.gpu_ids == (0,)
    assert placement.gpu_layers is None
    profile, verdict = placed(
        SHIPPED.get("llama3-8b"), plan_profile(SHIPPED.get("llama3-8b"), dual_3090), placement
    )
    assert profile.llama_cpp.n_ctx == placement.max_model_len
    assert verdict.gpu_ids == (0,)


def test_the_fleet_offloads_layers_when_residents_leave_too_little(
    dual_3090: GpuInventory,
) -> None:
    ledger = Ledger()
    for gpu in (0, 1):
        ledger = ledger.with_claim(
            Claim(engine_id=f"r{gpu}", gpu_ids=(gpu,), bytes_per_gpu=17 * GIB)
        )
    profile = SHIPPED.get("deepseek-r1-distill-14b-gguf")
    placement = place(profile, dual_3090, ledger)
    assert placement.placed
    assert placement.gpu_layers is not None
    assert placement.reasons[-1].startswith("partial offload beside the resident engines")
    # The claim fits beside the residents: at most what they left on each GPU.
    left = min(gpu.memory_total_bytes for gpu in dual_3090.gpus) - 17 * GIB
    assert placement.bytes_per_gpu <= left


# -- command lines ---------------------------------------------------------------------------------


def test_tiny_gguf_runs_llama_cpp_pythons_server_with_the_key_in_its_environment() -> None:
    profile = SHIPPED.get("tiny-gguf")
    verdict = plan_profile(profile, inventory_from_dict({"gpus": []}, source="none"))
    spec = build_engine_spec(
        profile, verdict, port=9123, vllm_python="v", hf_cache=None, hf_token=None,
        log_dir=None, instance="t", llama_cpp_python="/venv/bin/python",
    )  # fmt: skip
    command = list(spec.command)
    assert command[:3] == ["/venv/bin/python", "-m", "llama_cpp.server"]
    assert command[command.index("--model") + 1].endswith("tiny-gguf/tiny.gguf")
    assert command[command.index("--model_alias") + 1] == "tiny-gguf"
    assert command[command.index("--host") + 1] == "127.0.0.1"
    assert command[command.index("--port") + 1] == "9123"
    assert command[command.index("--n_gpu_layers") + 1] == "0"
    assert command[command.index("--n_ctx") + 1] == "256"
    assert spec.api_key is not None
    assert spec.api_key not in " ".join(command)
    assert set(spec.api_key_env) == {"VLLM_API_KEY", "LLAMA_API_KEY", "API_KEY"}
    assert spec.health_path == "/v1/models"


def test_gguf_docker_profiles_run_llama_server_fetching_the_repo_file() -> None:
    profile = SHIPPED.get("qwen2.5-7b-gguf")
    inventory = inventory_from_dict(json.loads(SNAPSHOT.read_text()), source="s")
    verdict = plan_profile(profile, inventory)
    spec = build_engine_spec(
        profile, verdict, port=9124, vllm_python="v", hf_cache="/srv/hf", hf_token=None,
        log_dir=None, instance="t",
    )  # fmt: skip
    command = list(spec.command)
    assert command[command.index("--hf-repo") + 1] == "bartowski/Qwen2.5-7B-Instruct-GGUF"
    assert command[command.index("--hf-file") + 1] == "Qwen2.5-7B-Instruct-Q4_K_M.gguf"
    assert command[command.index("--host") + 1] == "0.0.0.0"
    assert command[command.index("--n-gpu-layers") + 1] == "-1"
    assert command[command.index("--parallel") + 1] == "4"
    assert command[command.index("--ctx-size") + 1] == "32768"
    assert "--tensor-split" not in command  # one GPU
    assert spec.gpu_ids == verdict.gpu_ids
    assert spec.env["LLAMA_CACHE"].endswith("/llama.cpp")
    assert "/srv/hf" in spec.volumes
    assert spec.health_path == "/health"


def test_llama_cpp_pythons_server_takes_every_flag_a_spec_gives(
    llama_cpp_install: tuple[Path, Path], dual_3090: GpuInventory
) -> None:
    python, _ = llama_cpp_install
    tiny = SHIPPED.get("tiny-gguf")
    on_gpu = tiny.model_copy(
        update={"llama_cpp": tiny.llama_cpp.model_copy(update={"device": "gpu"})}
    )
    verdict = plan_profile(on_gpu, dual_3090)
    split = replace(verdict, gpu_ids=(0, 1))  # two GPUs: --tensor_split as well
    flags: set[str] = set()
    for profile, plan in ((tiny, plan_profile(tiny, dual_3090)), (on_gpu, split)):
        spec = build_engine_spec(
            profile, plan, port=9000, vllm_python="v", hf_cache=None, hf_token=None,
            log_dir=None, instance="t", llama_cpp_python=str(python),
        )  # fmt: skip
        flags |= {arg for arg in spec.command if arg.startswith("--")}
    helped = subprocess.run(
        [str(python), "-m", "llama_cpp.server", "--help"],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    ).stdout
    known = set(re.findall(r"--[a-z0-9][a-z0-9_]*", helped))
    assert "--tensor_split" in flags
    assert flags <= known, f"flags the server does not know: {sorted(flags - known)}"
