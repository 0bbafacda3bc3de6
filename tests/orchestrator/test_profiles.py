"""model_profiles.yml and its schema: the shipped file, each way a file can be wrong, reload."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from orchestrator.profiles import (
    Engine,
    ProfileError,
    ProfileRegistry,
    RuntimeKind,
    UnknownProfileError,
    export_json_schema,
    load_profiles,
    schema_text,
)
from tests.helpers.paths import REPO
from tests.helpers.vllm_engine import bootstrap_vllm_version

SHIPPED = REPO / "model_profiles.yml"
SCHEMA_FILE = REPO / "orchestrator" / "model_profiles.schema.json"
FIXTURES = REPO / "tests" / "fixtures" / "profiles"
VALID = FIXTURES / "valid.yml"

Mutation = Callable[[dict[str, Any]], None]


def valid_data() -> dict[str, Any]:
    """The valid fixture file as data, to change one thing in."""
    data: dict[str, Any] = yaml.safe_load(VALID.read_text())
    return data


def write(tmp_path: Path, data: dict[str, Any], name: str = "profiles.yml") -> Path:
    """Write `data` as a YAML profiles file and return its path."""
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def test_shipped_file_loads_with_the_seed_models_and_the_default() -> None:
    profiles = load_profiles(SHIPPED)
    assert len(profiles.profiles) >= 12
    assert profiles.default_id == "deepseek-r1-distill-14b"
    assert profiles.default.model == "deepseek-ai/DeepSeek-R1-Distill-Qwen-14B"
    models = {p.model for p in profiles.profiles.values()}
    for model in (
        "deepseek-ai/deepseek-coder-6.7b-instruct",
        "deepseek-ai/deepseek-coder-33b-instruct",
        "TheBloke/deepseek-coder-33B-instruct-AWQ",
        "Qwen/Qwen2-7B-Instruct",
        "Qwen/Qwen2.5-14B-Instruct",
        "meta-llama/Meta-Llama-3-8B-Instruct",
        "meta-llama/Meta-Llama-3-70B-Instruct",
        "casperhansen/llama-3-70b-instruct-awq",
        "microsoft/Phi-3-mini-4k-instruct",
        "codellama/CodeLlama-7b-Instruct-hf",
    ):
        assert model in models
    assert profiles.get("simulator").engine is Engine.SIMULATOR


def test_shipped_gpu_profiles_have_architecture_and_pinned_images() -> None:
    for profile in load_profiles(SHIPPED).profiles.values():
        if profile.uses_gpu:
            assert profile.architecture is not None, profile.id
        if profile.image is not None:
            assert ":" in profile.image
            assert not profile.image.endswith(":latest")


def test_shipped_vllm_images_are_the_release_the_tests_run() -> None:
    # The flags and endpoints the gateway relies on (--enable-sleep-mode, the dev-mode sleep
    # routes, ...) are checked against the vLLM the tests run; an older image may lack them.
    image = f"vllm/vllm-openai:v{bootstrap_vllm_version()}"
    shipped = load_profiles(SHIPPED).profiles.values()
    images = {
        profile.id: profile.image
        for profile in shipped
        if profile.engine is Engine.VLLM and profile.runtime is RuntimeKind.DOCKER
    }
    assert len(images) >= 10
    assert set(images.values()) == {image}, images
    # ...and so do the commands the READMEs give.
    for doc in (REPO / "README.md", REPO / "deploy" / "README.md"):
        assert set(re.findall(r"vllm/vllm-openai[:@][\w.:-]+", doc.read_text())) == {image}, doc


def test_shipped_tiny_cpu_profile_matches_the_local_tiny_llama() -> None:
    tiny = load_profiles(SHIPPED).get("tiny-cpu")
    arch = tiny.architecture
    assert arch is not None
    # scripts/make_tiny_model.py: hidden 128, 2 layers, 2 heads, 1 KV head, head_dim 64.
    assert (arch.hidden_size, arch.layers, arch.attention_heads, arch.kv_heads, arch.head_dim) == (
        128,
        2,
        2,
        1,
        64,
    )
    assert tiny.vllm.device == "cpu"
    assert tiny.vllm.dtype == "float32"
    assert tiny.max_model_len == 256
    assert tiny.model == "~/.cache/vllm-chat-gateway/tiny-llama"
    assert not tiny.uses_gpu


def test_ids_come_from_the_keys_and_names_resolve_to_profiles() -> None:
    profiles = load_profiles(VALID)
    assert [p.id for p in profiles.profiles.values()] == list(profiles.profiles)
    by_alias = profiles.by_served_name("Qwen/Qwen2-7B-Instruct")
    assert by_alias is not None
    assert by_alias.id == "small-gpu"
    by_name = profiles.by_served_name("sim")
    assert by_name is not None
    assert by_name.id == "sim"
    assert profiles.by_served_name("nobody") is None
    with pytest.raises(UnknownProfileError, match=r"no profile 'nope' \(known: small-gpu, "):
        profiles.get("nope")


def test_defaults_fill_in_per_engine() -> None:
    profiles = load_profiles(VALID)
    gpu = profiles.get("small-gpu")
    assert gpu.vllm.gpu_memory_utilization == 0.90
    assert gpu.vllm.tensor_parallel_size == "auto"
    assert gpu.startup_timeout == 900.0
    assert profiles.get("sim").startup_timeout == 60.0
    assert profiles.get("small-gpu-process").vllm.tensor_parallel_size == 2


def test_read_only_volumes_name_sources_of_volumes(tmp_path: Path) -> None:
    data = valid_data()
    data["profiles"]["small-gpu"]["volumes"] = {
        "/srv/chat-templates": "/templates",
        "/srv/models": "/models",
        "scratch": "/scratch",
    }
    data["profiles"]["small-gpu"]["read_only_volumes"] = ["/srv/models", "/srv/chat-templates"]
    profile = load_profiles(write(tmp_path, data)).get("small-gpu")
    assert profile.read_only_volumes == ("/srv/models", "/srv/chat-templates")
    assert profile.volumes["scratch"] == "/scratch"  # not listed: stays read-write
    assert load_profiles(VALID).get("small-gpu").read_only_volumes == ()  # the default


def test_sleep_mode_takes_a_gpu_vllm_profile_without_expandable_segments(
    tmp_path: Path,
) -> None:
    data = valid_data()
    profiles = data["profiles"]
    profiles["small-gpu"]["sleep_level"] = 1
    profiles["small-gpu"]["env"] = {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:False"}
    # Without sleep mode the allocator is the profile's business; a simulator has no torch.
    profiles["small-gpu-process"]["env"] = {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}
    profiles["sim"]["sleep_level"] = 2
    profiles["sim"]["vllm"]["device"] = "cpu"
    loaded = load_profiles(write(tmp_path, data))
    assert loaded.get("small-gpu").sleep_level == 1
    assert loaded.get("small-gpu-process").sleep_level == 0
    assert loaded.get("sim").sleep_level == 2


def _set(path: str, value: object) -> Mutation:
    """A mutation setting data[a][b][c] = value for path 'a.b.c'."""

    def mutate(data: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        node = data
        for key in parents:
            node = node[key]
        node[last] = value

    return mutate


def _each(*mutations: Mutation) -> Mutation:
    """A mutation applying `mutations` in order."""

    def mutate(data: dict[str, Any]) -> None:
        for mutation in mutations:
            mutation(data)

    return mutate


def _delete(path: str) -> Mutation:
    """A mutation deleting data[a][b][c] for path 'a.b.c'."""

    def mutate(data: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        node = data
        for key in parents:
            node = node[key]
        del node[last]

    return mutate


BAD_FILES: list[tuple[str, Mutation, str]] = [
    (
        "unknown field",
        _set("profiles.small-gpu.colour", "red"),
        "profile 'small-gpu': colour: Extra inputs are not permitted",
    ),
    (
        "unknown vllm field",
        _set("profiles.small-gpu.vllm.swap_space", 4),
        "profile 'small-gpu': vllm.swap_space: Extra inputs are not permitted",
    ),
    (
        "gpu_memory_utilization above 1",
        _set("profiles.small-gpu.vllm.gpu_memory_utilization", 1.5),
        "profile 'small-gpu': vllm.gpu_memory_utilization: Input should be less than or equal to 1",
    ),
    (
        "gpu_memory_utilization zero",
        _set("profiles.small-gpu.vllm.gpu_memory_utilization", 0),
        "profile 'small-gpu': vllm.gpu_memory_utilization: Input should be greater than 0",
    ),
    (
        "docker runtime without image",
        _delete("profiles.small-gpu.image"),
        "profile 'small-gpu': image: required for runtime docker",
    ),
    (
        "image tagged latest",
        _set("profiles.small-gpu.image", "vllm/vllm-openai:latest"),
        "profile 'small-gpu': image: 'vllm/vllm-openai:latest' is not pinned",
    ),
    (
        "image without a tag",
        _set("profiles.small-gpu.image", "vllm/vllm-openai"),
        "profile 'small-gpu': image: 'vllm/vllm-openai' is not pinned",
    ),
    (
        "alias used by another profile",
        _set("profiles.sim.aliases", ["sim-alias", "small"]),
        "profile 'sim': aliases: 'small' is already served by 'small-gpu'",
    ),
    (
        "served name used by another profile",
        _set("profiles.script.served_model_name", "sim-alias"),
        "profile 'script': served_model_name: 'sim-alias' is already served by 'sim'",
    ),
    (
        "alias repeats the served name",
        _set("profiles.sim.aliases", ["sim"]),
        "profile 'sim': aliases: each served name and alias must be different",
    ),
    (
        "extra arg the profile sets through a field",
        _set("profiles.small-gpu.vllm.extra_args", ["--port", "9000"]),
        "profile 'small-gpu': vllm.extra_args: --port is set through the gateway",
    ),
    (
        "extra arg in --flag=value form with underscores",
        _set("profiles.small-gpu.vllm.extra_args", ["--max_model_len=4096"]),
        "profile 'small-gpu': vllm.extra_args: --max_model_len is set through vllm.max_model_len",
    ),
    (
        "api key in extra args",
        _set("profiles.small-gpu.vllm.extra_args", ["--api-key=hunter2"]),
        "profile 'small-gpu': vllm.extra_args: --api-key is set through the gateway",
    ),
    (
        "trust-remote-code in extra args",
        _set("profiles.small-gpu.vllm.extra_args", ["--trust-remote-code"]),
        "profile 'small-gpu': vllm.extra_args: --trust-remote-code is set through "
        "trust_remote_code: true",
    ),
    (
        "sleep mode flag in extra args (sleep_level sets it)",
        _set("profiles.small-gpu.vllm.extra_args", ["--enable-sleep-mode"]),
        "profile 'small-gpu': vllm.extra_args: --enable-sleep-mode is set through sleep_level",
    ),
    (
        "sleep mode turned off in extra args",
        _set("profiles.small-gpu-process.vllm.extra_args", ["--no-enable-sleep-mode"]),
        "profile 'small-gpu-process': vllm.extra_args: --no-enable-sleep-mode is set through "
        "sleep_level",
    ),
    (
        "pipeline parallel size in extra args, with underscores",
        _set("profiles.small-gpu.vllm.extra_args", ["--pipeline_parallel_size=2"]),
        "profile 'small-gpu': vllm.extra_args: --pipeline_parallel_size is set through "
        "vllm.pipeline_parallel_size",
    ),
    (
        "executor backend in extra args (the planner's split sets it)",
        _set("profiles.small-gpu.vllm.extra_args", ["--distributed-executor-backend", "mp"]),
        "profile 'small-gpu': vllm.extra_args: --distributed-executor-backend is set through "
        "vllm.pipeline_parallel_size",
    ),
    (
        "pipeline parallel size zero",
        _set("profiles.small-gpu.vllm.pipeline_parallel_size", 0),
        "profile 'small-gpu': vllm.pipeline_parallel_size: must be 'auto' or a whole number "
        ">= 1, not 0",
    ),
    (
        "pipeline parallel across nodes for a command engine",
        _set("profiles.script.vllm", {"pipeline_parallel_size": "auto"}),
        "profile 'script': vllm.pipeline_parallel_size: engine command runs on one node",
    ),
    (
        "pipeline parallel across nodes on the vLLM CPU build",
        _set("profiles.cpu-tiny.vllm.pipeline_parallel_size", 2),
        "profile 'cpu-tiny': vllm.pipeline_parallel_size: a vllm.device cpu profile runs on one "
        "node",
    ),
    (
        "vLLM's dev mode in env (the gateway sets it for sleep mode)",
        _set("profiles.small-gpu.env", {"VLLM_SERVER_DEV_MODE": "1"}),
        "profile 'small-gpu': env: VLLM_SERVER_DEV_MODE is not allowed: the gateway sets it",
    ),
    (
        "sleep mode on the vLLM CPU build",
        _set("profiles.cpu-tiny.sleep_level", 1),
        "profile 'cpu-tiny': sleep_level: vLLM's sleep mode is CUDA-only",
    ),
    (
        "expandable segments with sleep mode",
        _each(
            _set("profiles.small-gpu.sleep_level", 2),
            _set(
                "profiles.small-gpu.env",
                {"PYTORCH_CUDA_ALLOC_CONF": "max_split_size_mb:512,expandable_segments:True"},
            ),
        ),
        "profile 'small-gpu': env: PYTORCH_CUDA_ALLOC_CONF: expandable_segments:True is not "
        "allowed with sleep_level 1 or 2",
    ),
    (
        "expandable segments under torch's newer name, with sleep mode",
        _each(
            _set("profiles.small-gpu-process.sleep_level", 1),
            _set("profiles.small-gpu-process.env", {"PYTORCH_ALLOC_CONF": "expandable_segments:1"}),
        ),
        "profile 'small-gpu-process': env: PYTORCH_ALLOC_CONF: expandable_segments:True is not "
        "allowed",
    ),
    (
        "env LD_PRELOAD",
        _set("profiles.small-gpu.env", {"LD_PRELOAD": "/tmp/evil.so"}),
        "profile 'small-gpu': env: LD_PRELOAD is not allowed",
    ),
    (
        "env PYTHONPATH",
        _set("profiles.cpu-tiny.env", {"PYTHONPATH": "/tmp"}),
        "profile 'cpu-tiny': env: PYTHONPATH is not allowed",
    ),
    (
        "env HF_TOKEN in the file",
        _set("profiles.cpu-tiny.env", {"HF_TOKEN": "hf_secret"}),
        "profile 'cpu-tiny': env: HF_TOKEN is not allowed: secrets come from the gateway",
    ),
    (
        "env key that is not a variable name",
        _set("profiles.cpu-tiny.env", {"1-BAD": "x"}),
        "profile 'cpu-tiny': env: '1-BAD' is not a valid environment variable name",
    ),
    (
        "docker socket volume",
        _set("profiles.small-gpu.volumes", {"/var/run/docker.sock": "/var/run/docker.sock"}),
        "profile 'small-gpu': volumes: /var/run/docker.sock: mounting this host path",
    ),
    (
        "host root volume",
        _set("profiles.small-gpu.volumes", {"/": "/host"}),
        "profile 'small-gpu': volumes: /: mounting this host path",
    ),
    (
        "volume escaping with ..",
        _set("profiles.small-gpu.volumes", {"/srv/models/../../etc": "/etc-copy"}),
        "profile 'small-gpu': volumes: /srv/models/../../etc: '..' is not allowed",
    ),
    (
        "relative volume source",
        _set("profiles.small-gpu.volumes", {"./models": "/models"}),
        "profile 'small-gpu': volumes: ./models: a volume source must be an absolute host path",
    ),
    (
        "volumes on a process runtime",
        _set("profiles.cpu-tiny.volumes", {"/srv": "/srv"}),
        "profile 'cpu-tiny': volumes: only runtime docker mounts volumes",
    ),
    (
        "read-only volume that is not one of the volumes",
        _set("profiles.small-gpu.read_only_volumes", ["/srv/models"]),
        "profile 'small-gpu': read_only_volumes: '/srv/models' is not a source (key) of volumes",
    ),
    (
        "read-only volume named by its container path",
        _set("profiles.small-gpu.read_only_volumes", ["/templates"]),
        "profile 'small-gpu': read_only_volumes: '/templates' is not a source (key) of volumes",
    ),
    (
        "read-only volume on a process runtime",
        _set("profiles.cpu-tiny.read_only_volumes", ["/srv"]),
        "profile 'cpu-tiny': read_only_volumes: '/srv' is not a source (key) of volumes",
    ),
    (
        "external without base_url",
        _delete("profiles.remote.base_url"),
        "profile 'remote': base_url: required for an external engine",
    ),
    (
        "external engine on the process runtime",
        _set("profiles.remote.runtime", "process"),
        "profile 'remote': runtime: engine external and runtime external go together",
    ),
    (
        "base_url that is not http",
        _set("profiles.remote.base_url", "file:///etc/passwd"),
        "profile 'remote': base_url: 'file:///etc/passwd' must be an http:// or https:// URL",
    ),
    (
        "base_url with credentials",
        _set("profiles.remote.base_url", "http://user:pw@10.0.0.5:8000/v1"),
        "profile 'remote': base_url: credentials in the URL are not allowed",
    ),
    (
        "command engine without a command",
        _delete("profiles.script.command"),
        "profile 'script': command: required for engine command",
    ),
    (
        "vllm engine without a model",
        _delete("profiles.small-gpu.model"),
        "profile 'small-gpu': model: required for engine vllm",
    ),
    (
        "GPU profile without architecture",
        _delete("profiles.small-gpu.architecture"),
        "profile 'small-gpu': architecture: required for a GPU profile",
    ),
    (
        "max_model_len beyond the model's context",
        _set("profiles.small-gpu.vllm.max_model_len", 65536),
        "profile 'small-gpu': vllm.max_model_len: 65536 is more than the model's context 32768",
    ),
    (
        "kv heads that do not group the attention heads",
        _set("profiles.small-gpu.architecture.kv_heads", 3),
        "profile 'small-gpu': architecture: kv_heads: 3 does not divide attention_heads 28",
    ),
    (
        "tensor parallel size that is neither a number nor auto",
        _set("profiles.small-gpu.vllm.tensor_parallel_size", "max"),
        "profile 'small-gpu': vllm.tensor_parallel_size: must be 'auto' or a whole number",
    ),
    (
        "model path with ..",
        _set("profiles.cpu-tiny.model", "~/models/../../etc"),
        "profile 'cpu-tiny': model: '..' is not allowed in a model path",
    ),
    (
        "profile id that is not kebab-case",
        lambda data: data["profiles"].update({"Bad_Id": data["profiles"].pop("script")}),
        "profile 'Bad_Id': id: must match",
    ),
    (
        "id written inside a profile",
        _set("profiles.sim.id", "other"),
        "profile 'sim': id: the key names the profile",
    ),
    (
        "unknown default",
        _set("default", "nope"),
        "default: 'nope' is not one of the profiles (small-gpu, ",
    ),
    (
        "missing served_model_name",
        _delete("profiles.sim.served_model_name"),
        "profile 'sim': served_model_name: Field required",
    ),
]


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [pytest.param(mutate, expected, id=name) for name, mutate, expected in BAD_FILES],
)
def test_bad_file_names_the_file_the_profile_and_the_field(
    tmp_path: Path, mutate: Mutation, expected: str
) -> None:
    data = valid_data()
    mutate(data)
    path = write(tmp_path, data)
    with pytest.raises(ProfileError) as caught:
        load_profiles(path)
    message = str(caught.value)
    assert expected in message
    assert message.startswith(f"{path}: ")
    assert caught.value.path == str(path)


def test_every_problem_of_a_file_is_reported(tmp_path: Path) -> None:
    data = valid_data()
    data["profiles"]["small-gpu"]["vllm"]["gpu_memory_utilization"] = 2
    data["profiles"]["remote"]["colour"] = "red"
    with pytest.raises(ProfileError) as caught:
        load_profiles(write(tmp_path, data))
    assert len(caught.value.problems) == 2
    assert any("profile 'small-gpu'" in p for p in caught.value.problems)
    assert any("profile 'remote': colour" in p for p in caught.value.problems)


def test_yaml_syntax_error_names_the_file_line_and_profile(tmp_path: Path) -> None:
    text = VALID.read_text().replace(
        "    served_model_name: sim\n", "    served_model_name: [sim\n"
    )
    path = tmp_path / "broken.yml"
    path.write_text(text)
    with pytest.raises(ProfileError) as caught:
        load_profiles(path)
    message = str(caught.value)
    assert message.startswith(f"{path}: ")
    assert "YAML syntax error at line" in message
    assert "profile 'sim'" in message


def test_anchors_and_aliases_are_refused(tmp_path: Path) -> None:
    text = VALID.read_text().replace(
        "    vllm:\n      max_model_len: 8192\n", "    vllm: &shared\n      max_model_len: 8192\n"
    )
    path = tmp_path / "anchors.yml"
    path.write_text(text)
    with pytest.raises(ProfileError, match=r"profile 'small-gpu': line \d+: anchors and aliases"):
        load_profiles(path)


def test_duplicate_profile_keys_are_refused(tmp_path: Path) -> None:
    text = VALID.read_text() + (
        "\n  sim:\n    display_name: again\n    engine: simulator\n"
        "    runtime: process\n    served_model_name: again\n"
    )
    path = tmp_path / "dupes.yml"
    path.write_text(text)
    with pytest.raises(ProfileError, match="duplicate key 'sim'"):
        load_profiles(path)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", "the file is empty"),
        ("- just\n- a list\n", "the top level must be a mapping"),
        ("default: x\n", "profiles: Field required"),
    ],
)
def test_files_without_profiles_are_refused(tmp_path: Path, text: str, expected: str) -> None:
    path = tmp_path / "odd.yml"
    path.write_text(text)
    with pytest.raises(ProfileError, match=expected):
        load_profiles(path)


def test_missing_file_is_a_profile_error(tmp_path: Path) -> None:
    with pytest.raises(ProfileError, match="cannot read the profiles file"):
        load_profiles(tmp_path / "absent.yml")


def test_reload_keeps_the_old_set_on_a_bad_file_and_takes_a_good_one(tmp_path: Path) -> None:
    data = valid_data()
    path = write(tmp_path, data)
    registry = ProfileRegistry(path)
    before = registry.current
    assert before.default_id == "small-gpu"

    path.write_text("default: small-gpu\nprofiles: [oops\n")
    with pytest.raises(ProfileError, match="YAML syntax error"):
        registry.reload()
    assert registry.current is before

    data["profiles"]["small-gpu"]["vllm"]["gpu_memory_utilization"] = 3
    write(tmp_path, data)
    with pytest.raises(ProfileError, match="gpu_memory_utilization"):
        registry.reload()
    assert registry.current is before

    data["profiles"]["small-gpu"]["vllm"]["gpu_memory_utilization"] = 0.8
    data["default"] = "sim"
    write(tmp_path, data)
    fresh = registry.reload()
    assert registry.current is fresh
    assert fresh.default_id == "sim"
    assert fresh.get("small-gpu").vllm.gpu_memory_utilization == 0.8


def test_committed_json_schema_is_the_current_export() -> None:
    regenerate = "python -m orchestrator.profiles schema > orchestrator/model_profiles.schema.json"
    assert SCHEMA_FILE.read_text() == schema_text(), f"stale; regenerate: {regenerate}"
    assert json.loads(SCHEMA_FILE.read_text()) == export_json_schema()


def test_json_schema_describes_the_file_and_refuses_unknown_fields() -> None:
    schema = export_json_schema()
    assert schema["required"] == ["default", "profiles"]
    profile = schema["$defs"]["Profile"]
    assert profile["additionalProperties"] is False
    assert "id" not in profile["properties"]  # set from the key, never written
    assert schema["$defs"]["VllmArgs"]["properties"]["gpu_memory_utilization"]["maximum"] == 1


def test_shipped_yaml_points_editors_at_the_schema() -> None:
    first_line = SHIPPED.read_text().splitlines()[0]
    assert first_line == "# yaml-language-server: $schema=orchestrator/model_profiles.schema.json"
