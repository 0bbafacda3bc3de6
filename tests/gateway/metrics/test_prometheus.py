"""The shipped Prometheus config scrapes a running gateway, and every PromQL expression of
every shipped dashboard returns series from it: no panel points at a metric that does not exist.

Real pieces only: Debian's prometheus binary with deploy/prometheus.yml (its target and token
file pointed at this test's gateway), a gateway served by uvicorn with the engine simulator as
its local engine, a second simulator standing in for the cloud, and traffic that produces each
kind of event the dashboards show (a stream, an overflow, a 429, auth failures, a client that
leaves mid-stream).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.deploy.grafana import DEPLOY, concrete, dashboards, panels, variable_queries
from tests.helpers.metrics import Scrape, scrape
from tests.helpers.paths import REPO
from tests.helpers.profiles import standing_in_for_7b
from tests.helpers.prometheus_server import PrometheusServer, prometheus_binary
from tests.helpers.proxy import (
    AUTH,
    HELLO,
    Gateway,
    gateway,
    gateway_settings,
    sim_profile,
    simulator_process,
)

TOKEN = "prom-scrape-Vb7Nq2Lx9Kd4Wm1Z"
ADMIN_PASSWORD = "adm1n-Prom-test-7c1e"
USER_PASSWORD = "us3r-Prom-test-2d9f"
CLOUD_KEY = "CLOUD-KEY-prom"
SLOW = ("--tokens-per-second", "20")
STREAM = {"messages": HELLO, "max_tokens": 20, "ignore_eos": True, "stream": True}


def scrape_config(gateway_url: str, token_file: Path) -> dict[str, Any]:
    """deploy/prometheus.yml with its target and token file pointed at this test."""
    config: dict[str, Any] = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    jobs = config["scrape_configs"]
    assert [job["job_name"] for job in jobs] == ["vllm-gateway"]
    job = jobs[0]
    assert job["authorization"]["type"] == "Bearer"
    assert job["authorization"]["credentials_file"]
    assert len(job["static_configs"]) == 1
    job["authorization"]["credentials_file"] = str(token_file)
    job["static_configs"][0]["targets"] = [gateway_url.removeprefix("http://")]
    config["global"]["scrape_interval"] = "1s"
    config["global"]["evaluation_interval"] = "1s"
    return config


@pytest.fixture
async def cloud() -> AsyncIterator[str]:
    """A simulator standing in for the cloud upstream."""
    async with simulator_process("--model", "cloud-model", "--api-key", CLOUD_KEY, *SLOW) as url:
        yield url


async def produce_traffic(gw: Gateway) -> None:
    """One of each event the dashboards show."""
    http = gw.http
    admin = await http.post(
        "/admin/api/login", json={"username": "admin", "password": ADMIN_PASSWORD}
    )
    assert admin.status_code == 200, admin.text
    admin_auth = {"Authorization": f"Bearer {admin.json()['access_token']}"}
    created = await http.post(
        "/admin/api/users",
        json={"username": "fran", "password": USER_PASSWORD, "tier": "free"},
        headers=admin_auth,
    )
    assert created.status_code == 201, created.text
    login = await http.post("/api/auth/login", json={"username": "fran", "password": USER_PASSWORD})
    user_auth = {"Authorization": f"Bearer {login.json()['access_token']}"}
    key = await http.post("/api/keys", json={"description": "dashboards"}, headers=user_auth)
    assert key.status_code == 201, key.text
    key_auth = {"Authorization": f"Bearer {key.json()['key']}"}

    # A free key: a whole answer and a stream, then the third request is over the limit.
    body = {"messages": HELLO, "max_tokens": 5}
    assert (await http.post("/v1/chat/completions", json=body, headers=key_auth)).status_code == 200
    stream = await http.post(
        "/v1/chat/completions", json={**body, "stream": True}, headers=key_auth
    )
    assert stream.status_code == 200, stream.text
    limited = await http.post("/v1/chat/completions", json=body, headers=key_auth)
    assert limited.status_code == 429, limited.text

    # Auth failures: a wrong password, an unknown key, no credentials.
    wrong = await http.post("/api/auth/login", json={"username": "fran", "password": "nope-nope"})
    assert wrong.status_code == 401
    bad_key = {"Authorization": "Bearer sk-vcg-not-a-real-key-000000000000"}
    assert (await http.get("/v1/models", headers=bad_key)).status_code == 401
    assert (await http.get("/v1/models")).status_code == 401

    # One local slot (MAX_QUEUE_SIZE=1): of two slow streams at once, one overflows to the cloud.
    async def slow_stream() -> str:
        response = await http.post("/v1/chat/completions", json=STREAM, headers=AUTH)
        assert response.status_code == 200, response.text
        return response.headers["x-gateway-route"]

    routes = await asyncio.gather(slow_stream(), slow_stream())
    assert sorted(routes) == ["cloud", "local"], routes

    # A client that leaves mid-stream.
    async with http.stream("POST", "/v1/chat/completions", json=STREAM, headers=AUTH) as left:
        assert left.status_code == 200
        async for _ in left.aiter_lines():
            break


async def test_every_dashboard_query_returns_series_from_a_real_scrape(
    cloud: str, tmp_path: Path
) -> None:
    prometheus_binary()
    settings = gateway_settings(
        # Placed on the recorded GPUs as a 7B model: the fleet's VRAM panels have a claim.
        {"local": standing_in_for_7b(sim_profile("local-sim", *SLOW))},
        "local",
        REQUIRE_AUTH=True,
        ADMIN_PASSWORD=ADMIN_PASSWORD,
        LOGIN_RATE_LIMIT_PER_MINUTE=1000,
        RATE_LIMIT_FREE_PER_MINUTE=2,
        OPENAI_API_KEY=CLOUD_KEY,
        OPENAI_BASE_URL=f"{cloud}/v1",
        CLOUD_MODEL="cloud-model",
        MAX_QUEUE_SIZE=1,
        METRICS_TOKEN=TOKEN,
        GPU_SNAPSHOT=str(REPO / "tests" / "fixtures" / "gpu" / "dual_rtx3090.json"),
        METRICS_GPU_INTERVAL_S=0.5,
    )
    token_file = tmp_path / "metrics_token"
    token_file.write_text(TOKEN)
    async with gateway(settings) as gw:
        prometheus = PrometheusServer(scrape_config(gw.url, token_file))
        try:
            await prometheus.wait_ready()
            before = await scrape(gw.http, TOKEN)
            await produce_traffic(gw)
            done = time.time()

            async def scraped_after_traffic() -> bool:
                # Two scrapes after the traffic (rate() needs two samples of everything); the
                # first scrape comes a few seconds after start (target discovery is batched).
                up = await prometheus.query('timestamp(up{job="vllm-gateway"} == 1)')
                count = await prometheus.query('count_over_time(up{job="vllm-gateway"}[1m])')
                return (
                    bool(up and count)
                    and float(up[0]["value"][1]) > done + 2
                    and float(count[0]["value"][1]) >= 3
                )

            deadline = time.monotonic() + 30
            while not await scraped_after_traffic():
                assert time.monotonic() < deadline, prometheus.logs()
                await asyncio.sleep(0.5)
            await check_dashboards(prometheus)
            await check_values(prometheus, before)
        finally:
            prometheus.stop()


async def check_dashboards(prometheus: PrometheusServer) -> None:
    """Every panel target and every variable of every dashboard finds series."""
    empty: list[str] = []
    checked = 0
    for name, board in dashboards().items():
        for panel in panels(board):
            for target in panel.get("targets", []):
                expr = target["expr"]
                # A constant fallback would make any panel "return a series".
                assert "vector(" not in expr, f"{name} / {panel['title']}: {expr}"
                result = await prometheus.query(concrete(expr, board))
                checked += 1
                if not result:
                    empty.append(f"{name} / {panel['title']} / {target['refId']}: {expr}")
    assert checked >= 40, checked
    assert not empty, "panels without data:\n" + "\n".join(empty)
    for name, metric, label in variable_queries():
        values = await prometheus.label_values(label, metric)
        assert values, f"{name}: label_values({metric}, {label}) is empty"


async def check_values(prometheus: PrometheusServer, before: Scrape) -> None:
    """The series say what happened (so the panels above show the right thing). Counters are
    per process and other tests ran in this one: each is compared with its value before."""

    async def one(expr: str) -> float:
        result = await prometheus.query(expr)
        assert len(result) == 1, (expr, result)
        return float(result[0]["value"][1])

    async def grew(metric: str, **labels: str) -> float:
        selector = ", ".join(f'{k}="{v}"' for k, v in labels.items())
        return await one(f"sum({metric}{{{selector}}})") - before.value(metric, **labels)

    assert await grew("gateway_rate_limit_rejections_total", tier="free", limit="requests") == 1
    assert await grew("gateway_auth_failures_total", reason="invalid_api_key") == 1
    assert await grew("gateway_auth_failures_total", reason="missing_credentials") == 1
    assert await grew("gateway_http_requests_total", route="/api/auth/login", status="401") == 1
    assert await grew("gateway_overflow_total", model="local-sim") == 1
    assert await grew("gateway_model_requests_total", model="cloud-model", upstream="cloud") == 1
    assert await grew("gateway_model_requests_total", model="local-sim", upstream="local") == 4
    assert await grew("gateway_model_errors_total", reason="client_disconnected") == 1
    assert await grew("gateway_model_time_to_first_token_seconds_count", model="local-sim") == 3
    assert await one('gateway_engine_state{profile="local", state="ready"}') == 1
    assert await one("sum(gateway_gpu_memory_total_bytes)") == 2 * 24576 * 1024 * 1024
    # The fleet: one engine, ready, holding its budget on one GPU since its cold start.
    assert await one('gateway_fleet_engines{state="ready"}') == 1
    assert await one("sum(gateway_fleet_engines)") == 1
    assert await one('count(gateway_fleet_vram_claim_bytes{engine="local"})') == 1
    assert (
        await one("sum(gateway_fleet_vram_claim_bytes) - sum(gateway_fleet_vram_budget_bytes)") == 0
    )
    assert await one('sum(gateway_fleet_operation_seconds_count{kind="cold"})') >= 1
    assert await one("sum(gateway_fleet_evictions_total)") == before.value(
        "gateway_fleet_evictions_total"
    )
    # Prometheus reached the gateway with the token: the scrape itself is healthy.
    assert await one('up{job="vllm-gateway"}') == 1
