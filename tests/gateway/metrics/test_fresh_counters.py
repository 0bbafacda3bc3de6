"""A fresh gateway's dashboards show 0, not "no data": every labelled counter a shipped dashboard
queries exists at 0 for its known label values from startup.

Prometheus's registry lives as long as the interpreter (earlier tests in this process have
counted things already), so the gateway runs as its own process here.
"""

from __future__ import annotations

import re
from pathlib import Path

from gateway.metrics.recorders import AUTH_FAILURE_REASONS, RATE_LIMIT_LABELS
from gateway.proxy.metrics import ERROR_REASONS
from orchestrator.profiles import load_profiles
from tests.deploy.grafana import queries
from tests.helpers.gateway_process import gateway_process
from tests.helpers.metrics import scrape
from tests.helpers.paths import REPO

_COUNTER = re.compile(r"\b(gateway_[a-z0-9_]+_total)\b")
# Counted by the requests that show the gateway is up (the startup probe's /health), so never 0.
_COUNTS_TRAFFIC = {"gateway_http_requests_total"}
_CLOUD_MODEL = "gpt-4o-mini"


def _dashboard_counters() -> set[str]:
    return {name for query in queries() for name in _COUNTER.findall(query.expr)}


async def test_every_dashboard_counter_exists_at_zero_on_a_fresh_gateway(tmp_path: Path) -> None:
    counters = _dashboard_counters()
    # The dashboards do query labelled counters: the test below would pass vacuously otherwise.
    assert {"gateway_rate_limit_rejections_total", "gateway_auth_failures_total"} <= counters
    profiles = load_profiles(REPO / "model_profiles.yml")
    async with gateway_process(
        None, tmp_path, OPENAI_API_KEY="sk-not-used-0123456789", CLOUD_MODEL=_CLOUD_MODEL
    ) as (client, _):
        fresh = await scrape(client)

    for name in sorted(counters):
        samples = [(labels, value) for n, labels, value in fresh.samples if n == name]
        assert samples, f"{name}: no series on a fresh gateway (a dashboard shows 'no data')"
        if name not in _COUNTS_TRAFFIC:
            assert all(value == 0 for _, value in samples), (name, samples)

    limited = {
        (lab["tier"], lab["limit"]) for lab in fresh.series("gateway_rate_limit_rejections_total")
    }
    assert set(RATE_LIMIT_LABELS) <= limited
    assert set(AUTH_FAILURE_REASONS) <= fresh.label_values("gateway_auth_failures_total", "reason")

    served = {profile.served_model_name for profile in profiles.profiles.values()}
    errors = {
        (lab["model"], lab["upstream"], lab["reason"])
        for lab in fresh.series("gateway_model_errors_total")
    }
    for model in served:
        assert {(model, "local", reason) for reason in ERROR_REASONS} <= errors, model
    assert {(_CLOUD_MODEL, "cloud", reason) for reason in ERROR_REASONS} <= errors
    assert served <= fresh.label_values("gateway_overflow_total", "model")
    assert served <= fresh.label_values("gateway_model_requests_total", "model")
    tokens = {
        (lab["model"], lab["direction"]) for lab in fresh.series("gateway_model_tokens_total")
    }
    assert {(model, "prompt") for model in served} <= tokens
    assert {(model, "completion") for model in served} <= tokens
    switches = {
        (lab["profile"], lab["outcome"]) for lab in fresh.series("gateway_engine_switches_total")
    }
    for profile_id in profiles.profiles:
        for outcome in ("succeeded", "rolled_back", "failed"):
            assert (profile_id, outcome) in switches
    # Engine restarts after a crash: 0 for every profile, not "no data".
    assert "gateway_engine_restarts_total" in counters
    assert set(profiles.profiles) <= fresh.label_values("gateway_engine_restarts_total", "profile")
