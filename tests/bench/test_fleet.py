"""bench/fleet.py in its quickest mode: it runs to the end against three real gateways and
their simulator engines, with a result per policy and no failed request on the fleet."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers.paths import REPO

REQUESTS = 12


@pytest.mark.timeout(600)
def test_quick_fleet_bench_has_a_result_per_policy_and_no_failed_fleet_request(
    tmp_path: Path,
) -> None:
    result_file = tmp_path / "fleet.json"
    run = subprocess.run(
        [sys.executable, "bench/fleet.py", "--quick", "--requests", str(REQUESTS),
         "--json", str(result_file)],
        cwd=REPO, capture_output=True, text=True, timeout=540, check=False,
    )  # fmt: skip
    assert result_file.is_file(), run.stdout + run.stderr
    policies = {p["policy"]: p for p in json.loads(result_file.read_text())["policies"]}
    assert list(policies) == ["single", "fleet", "fleet+sleep"]
    for name, result in policies.items():
        assert result["requests"] == REQUESTS, name
        assert result["ttft_p95_s"] is not None, name
    # The trace changes model: one engine at a time must swap, with cold starts only.
    assert policies["single"]["cold_starts"] > 0
    assert policies["single"]["wakes"] == 0
    for name in ("fleet", "fleet+sleep"):
        assert policies[name]["failed"] == 0, policies[name]["errors"]
    assert run.returncode == (1 if policies["single"]["failed"] else 0), run.stderr
