"""deploy/compose.yml passes `docker-compose config` with deploy/.env.example; the stack's
pieces agree with each other (token file, mounts, ports); .env.example lists every setting;
prometheus.yml passes `promtool check config`."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from gateway.settings import Settings
from tests.deploy.grafana import DEPLOY
from tests.deploy.tools import require_tool

SERVICES = {"gateway", "postgres", "redis", "prometheus", "grafana"}


def _stack(tmp_path: Path, env: str | None = None) -> Path:
    """A copy of deploy/ with .env made from .env.example (as an operator starts)."""
    target = tmp_path / "deploy"
    shutil.copytree(DEPLOY, target)
    (target / ".env").write_text(env if env is not None else (DEPLOY / ".env.example").read_text())
    return target


def _config(stack: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [require_tool("docker-compose"), "-f", "compose.yml", "config"],
        cwd=stack,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.fixture
def resolved(tmp_path: Path) -> dict[str, Any]:
    result = _config(_stack(tmp_path))
    assert result.returncode == 0, result.stderr
    config: dict[str, Any] = yaml.safe_load(result.stdout)
    return config


def test_docker_compose_config_accepts_the_stack(resolved: dict[str, Any]) -> None:
    services = resolved["services"]
    assert set(services) == SERVICES
    gateway = services["gateway"]
    # The engines publish on the host's 127.0.0.1: the gateway shares the host network.
    assert gateway["network_mode"] == "host"
    assert any(
        v.startswith("/var/run/docker.sock:/var/run/docker.sock") for v in gateway["volumes"]
    )
    devices = gateway["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"capabilities": ["gpu"], "count": "all", "driver": "nvidia"}]
    env = gateway["environment"]
    assert env["DATABASE_URL"].startswith("postgresql+asyncpg://gateway:")
    assert env["REDIS_URL"] == "redis://127.0.0.1:6379/0"
    assert env["METRICS_TOKEN"] == services["prometheus"]["environment"]["METRICS_TOKEN"]
    assert gateway["depends_on"]["postgres"]["condition"] == "service_healthy"
    # Only named volumes hold state; databases and dashboards are not reachable off the host.
    assert set(resolved["volumes"]) >= {
        "gateway-state", "postgres-data", "redis-data", "prometheus-data", "grafana-data",
    }  # fmt: skip
    for name in ("postgres", "redis", "prometheus", "grafana"):
        for port in services[name].get("ports", []):
            text = port if isinstance(port, str) else f"{port.get('host_ip')}:{port}"
            assert text.startswith("127.0.0.1:"), (name, port)


def test_a_missing_required_value_is_refused(tmp_path: Path) -> None:
    env = re.sub(r"(?m)^POSTGRES_PASSWORD=.*$", "", (DEPLOY / ".env.example").read_text())
    result = _config(_stack(tmp_path, env))
    assert result.returncode != 0
    assert "POSTGRES_PASSWORD" in result.stderr


def test_the_docker_socket_carries_its_risk_next_to_it() -> None:
    lines = (DEPLOY / "compose.yml").read_text().splitlines()
    socket = next(i for i, line in enumerate(lines) if "/var/run/docker.sock:" in line)
    nearby = "\n".join(lines[max(0, socket - 12) : socket])
    assert "RISK" in nearby
    assert "root" in nearby


def test_prometheus_reads_the_token_file_the_entrypoint_writes(tmp_path: Path) -> None:
    compose = yaml.safe_load((DEPLOY / "compose.yml").read_text())
    command = " ".join(compose["services"]["prometheus"]["command"])
    scrape = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())["scrape_configs"][0]
    token_file = scrape["authorization"]["credentials_file"]
    assert f"> {token_file}" in command
    assert "--config.file=/etc/prometheus/prometheus.yml" in command
    assert (
        "./prometheus.yml:/etc/prometheus/prometheus.yml:ro"
        in (compose["services"]["prometheus"]["volumes"])
    )
    # The target is the gateway on the host network, at the port compose gives it.
    assert scrape["static_configs"][0]["targets"] == ["host.docker.internal:8080"]
    assert "host.docker.internal:host-gateway" in compose["services"]["prometheus"]["extra_hosts"]


def test_promtool_accepts_prometheus_yml(tmp_path: Path) -> None:
    config = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    token = tmp_path / "metrics_token"
    token.write_text("a-token-for-promtool-0123")
    config["scrape_configs"][0]["authorization"]["credentials_file"] = str(token)
    path = tmp_path / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))
    result = subprocess.run(
        [require_tool("promtool"), "check", "config", str(path)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr


def test_env_example_lists_every_setting() -> None:
    text = (DEPLOY / ".env.example").read_text()
    listed = set(re.findall(r"(?m)^#?\s?([A-Z][A-Z0-9_]+)=", text))
    settings = {name for name, field in Settings.model_fields.items() if not field.exclude}
    missing = sorted(settings - listed)
    assert not missing, f"settings missing from deploy/.env.example: {missing}"
    # Values an operator must change are placeholders the gateway refuses.
    for name in ("JWT_SECRET", "METRICS_TOKEN"):
        value = re.search(rf"(?m)^{name}=(.*)$", text)
        assert value, name
        assert "change-me" in value.group(1), name
