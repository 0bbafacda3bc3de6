"""GET /metrics: who may scrape, what the series count, and that labels stay bounded."""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any

import httpx
import pytest
from asgi_lifespan import LifespanManager

from gateway.app import create_app
from gateway.settings import Settings
from tests.helpers.app import make_settings, running_app
from tests.helpers.metrics import Scrape, all_label_values, scrape, wait_engine_ready
from tests.helpers.paths import REPO
from tests.helpers.polling import eventually

SNAPSHOT = REPO / "tests" / "fixtures" / "gpu" / "dual_rtx3090.json"
TOKEN = "scrape-Tq8wZ3kP0vN5xR2mL7yB"


def _settings(sqlite_url: str, **overrides: Any) -> Settings:
    return make_settings(DATABASE_URL=sqlite_url, LOG_LEVEL="WARNING", **overrides)


async def _client_from(app: Any, host: str) -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=app, client=(host, 40000))
    return httpx.AsyncClient(transport=transport, base_url="http://gateway.test")


# -- who may scrape -----------------------------------------------------------------------------


async def test_with_a_token_only_that_token_scrapes(sqlite_url: str) -> None:
    async with running_app(_settings(sqlite_url, METRICS_TOKEN=TOKEN)) as (_, client):
        for headers in (
            {},
            {"Authorization": "Bearer wrong-token-0123456789"},
            {"Authorization": f"Basic {TOKEN}"},
            {"Authorization": f"Bearer {TOKEN}x"},
        ):
            response = await client.get("/metrics", headers=headers)
            assert response.status_code == 401, (headers, response.text)
            assert response.headers["www-authenticate"] == "Bearer"
            assert response.headers["x-error-source"] == "gateway"
            error = response.json()["error"]
            assert error == {
                "message": error["message"],
                "type": "authentication_error",
                "param": None,
                "code": "invalid_metrics_token",
            }
            assert TOKEN not in response.text
        ok = await scrape(client, TOKEN)
        assert ok.value("gateway_build_info") == 1
        assert ok.value("gateway_auth_failures_total", reason="invalid_metrics_token") >= 4


async def test_without_a_token_only_direct_loopback_peers_scrape(sqlite_url: str) -> None:
    app = create_app(_settings(sqlite_url))
    async with LifespanManager(app) as manager:
        local = await _client_from(manager.app, "127.0.0.1")
        remote = await _client_from(manager.app, "192.0.2.10")
        async with local, remote:
            assert (await local.get("/metrics")).status_code == 200
            refused = await remote.get("/metrics")
            assert refused.status_code == 403
            assert refused.json()["error"]["code"] == "metrics_loopback_only"
            # A reverse proxy on the same host connects from the loopback for everyone.
            for header in ("X-Forwarded-For", "Forwarded", "X-Real-IP"):
                proxied = await local.get("/metrics", headers={header: "192.0.2.10"})
                assert proxied.status_code == 403, header


async def test_trusted_proxies_are_not_local_scrapers(sqlite_url: str) -> None:
    app = create_app(_settings(sqlite_url, TRUSTED_PROXIES="127.0.0.1"))
    async with LifespanManager(app) as manager:
        client = await _client_from(manager.app, "127.0.0.1")
        async with client:
            assert (await client.get("/metrics")).status_code == 403


async def test_metrics_can_be_switched_off(sqlite_url: str) -> None:
    async with running_app(_settings(sqlite_url, METRICS_ENABLED=False)) as (_, client):
        assert (await client.get("/metrics")).status_code == 404


def test_a_short_or_placeholder_token_is_refused() -> None:
    with pytest.raises(ValueError, match="shorter than 16"):
        make_settings(METRICS_TOKEN="short")
    with pytest.raises(ValueError, match="placeholder"):
        make_settings(METRICS_TOKEN="change-me-metrics-token")


# -- HTTP series ------------------------------------------------------------------------------


async def test_http_series_use_route_templates_and_bounded_labels(sqlite_url: str) -> None:
    secret_path_id = str(uuid.uuid4())
    async with running_app(_settings(sqlite_url)) as (_, client):
        before = await scrape(client)
        for _ in range(3):
            assert (await client.get("/health")).status_code == 200
        await client.get(f"/api/keys/{secret_path_id}")  # 405 on a templated route
        await client.get(f"/no/such/{secret_path_id}")  # no route at all
        await client.request("BREW", "/health")  # a method nobody declares
        after = await scrape(client)
    count = "gateway_http_requests_total"
    health = {"route": "/health", "method": "GET", "status": "200"}
    assert after.value(count, **health) - before.value(count, **health) == 3
    assert after.value(count, route="/api/keys/{key_id}", method="GET", status="405") >= 1
    assert after.value(count, route="unmatched", status="404") >= 1
    assert after.label_values(count, "method") <= {
        "GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "other",
    }  # fmt: skip
    assert "other" in after.label_values(count, "method")
    hist = "gateway_http_request_duration_seconds_count"
    assert (
        after.value(hist, route="/health", method="GET")
        - before.value(hist, route="/health", method="GET")
        == 3
    )
    # Raw paths and ids never become labels.
    assert secret_path_id not in after.text
    assert all("/no/such" not in value for value in all_label_values(after.samples))


# -- the proxy, engine and GPUs ---------------------------------------------------------------


async def test_model_series_match_the_usage_the_engine_reported(sqlite_url: str) -> None:
    settings = _settings(
        sqlite_url, ENGINE="simulator", GPU_SNAPSHOT=str(SNAPSHOT), METRICS_GPU_INTERVAL_S=30
    )
    async with running_app(settings) as (_, client):
        await wait_engine_ready(client)
        before = await scrape(client)
        body = {"model": "current", "messages": [{"role": "user", "content": "hi"}]}
        whole = await client.post("/v1/chat/completions", json={**body, "max_tokens": 7})
        assert whole.status_code == 200, whole.text
        usage = [whole.json()["usage"]]
        stream_body = {**body, "max_tokens": 5, "stream": True,
                       "stream_options": {"include_usage": True}}  # fmt: skip
        async with client.stream("POST", "/v1/chat/completions", json=stream_body) as stream:
            events = [line[6:] async for line in stream.aiter_lines() if line.startswith("data: ")]
        usage.append(next(json.loads(e)["usage"] for e in events if '"usage":{' in e))
        unknown = await client.post("/v1/chat/completions", json={**body, "model": "no-such-x"})
        assert unknown.status_code == 404
        after = await scrape(client)

    def delta(name: str, **labels: str) -> float:
        return after.value(name, **labels) - before.value(name, **labels)

    sim = {"model": "simulator", "upstream": "local"}
    assert delta("gateway_model_requests_total", **sim) == 2
    assert delta("gateway_model_tokens_total", direction="prompt", **sim) == sum(
        u["prompt_tokens"] for u in usage
    )
    assert delta("gateway_model_tokens_total", direction="completion", **sim) == sum(
        u["completion_tokens"] for u in usage
    )
    # Time to first token is a streaming measure: one stream, one observation.
    assert delta("gateway_model_time_to_first_token_seconds_count", **sim) == 1
    assert delta("gateway_model_request_duration_seconds_count", **sim) == 2
    assert delta("gateway_model_generation_tokens_per_second_count", **sim) == 2
    assert delta("gateway_queue_wait_seconds_count", outcome="admitted") == 2
    assert delta("gateway_model_errors_total") == 0
    # An unknown model asked for is not a label.
    assert "no-such-x" not in after.text
    # (The registry is per process: earlier tests' models may be there already.)
    added = after.label_values("gateway_model_requests_total", "model") - before.label_values(
        "gateway_model_requests_total", "model"
    )
    assert added <= {"simulator", "other"}
    # The engine: its state per profile and the switch that started it.
    assert after.value("gateway_engine_state", profile="simulator", state="ready") == 1
    assert after.value("gateway_engine_state", profile="simulator", state="loading") == 0
    assert after.value("gateway_engine_state", profile="qwen2-7b", state="idle") == 1
    assert (
        after.value("gateway_engine_switches_total", profile="simulator", outcome="succeeded") >= 1
    )
    assert after.value("gateway_engine_switch_duration_seconds_count", outcome="succeeded") >= 1
    assert after.value("gateway_in_flight_requests", upstream="local") == 0
    assert after.value("gateway_queue_depth") == 0
    assert after.value("gateway_local_slots") == settings.MAX_QUEUE_SIZE


async def test_gpu_series_come_from_the_reader_on_an_interval_not_per_scrape(
    sqlite_url: str,
) -> None:
    snapshot = json.loads(SNAPSHOT.read_text())
    slow = _settings(sqlite_url, GPU_SNAPSHOT=str(SNAPSHOT), METRICS_GPU_INTERVAL_S=30)
    async with running_app(slow) as (_, client):

        async def sampled() -> Scrape | None:
            got = await scrape(client)
            return got if got.value("gateway_gpu_count") == 2 else None

        first: Scrape = await eventually(sampled)
        await asyncio.sleep(0.3)
        second = await scrape(client)
    stamp = "gateway_gpu_last_sample_timestamp_seconds"
    assert first.value(stamp) > 0
    assert second.value(stamp) == first.value(stamp), "a scrape must not read the GPUs"
    for gpu in snapshot["gpus"]:
        label = str(gpu["index"])
        assert first.value("gateway_gpu_memory_total_bytes", gpu=label) == gpu["memory_total_bytes"]
        assert first.value("gateway_gpu_memory_used_bytes", gpu=label) == gpu["memory_used_bytes"]
        assert first.value("gateway_gpu_temperature_celsius", gpu=label) == gpu["temperature_c"]
        assert first.value("gateway_gpu_power_watts", gpu=label) == pytest.approx(
            gpu["power_draw_w"]
        )
        assert first.value("gateway_gpu_utilization_ratio", gpu=label) == pytest.approx(
            gpu["utilization_percent"] / 100
        )
        assert first.value("gateway_gpu_info", gpu=label, name=gpu["name"]) == 1

    fast = _settings(sqlite_url, GPU_SNAPSHOT=str(SNAPSHOT), METRICS_GPU_INTERVAL_S=0.1)
    async with running_app(fast) as (_, client):
        start = (await scrape(client)).value(stamp)

        async def moved() -> bool:
            return (await scrape(client)).value(stamp) > start

        await eventually(moved, 5)
