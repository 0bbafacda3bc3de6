"""bench/fleet.py in its quickest mode: it runs to the end against three real gateways and
their simulator engines, with a result per policy, no failed request on the fleet, and no GPU
ever claimed past its memory by the placement ledger (a wake beside busy engines once did)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers.paths import REPO

REQUESTS = 12


@pytest.mark.timeout(600)
def test_quick_fleet_bench_has_a_result_per_policy_no_failed_fleet_request_nor_overclaim(
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
        # The ledger was sampled during the trace, and never claimed more of a GPU of the
        # recorded reading than that GPU has.
        totals, peaks = result["gpu_total_gib"], result["peak_claim_gib"]
        assert peaks, name
        assert set(peaks) <= set(totals), (name, peaks, totals)
        for gpu, peak in peaks.items():
            assert 0 < peak <= totals[gpu], (name, gpu, peak, totals[gpu])
    # The trace changes model: one engine at a time must swap, with cold starts only.
    assert policies["single"]["cold_starts"] > 0
    assert policies["single"]["wakes"] == 0
    for name in ("fleet", "fleet+sleep"):
        assert policies[name]["failed"] == 0, policies[name]["errors"]
    assert run.returncode == (1 if policies["single"]["failed"] else 0), run.stderr
