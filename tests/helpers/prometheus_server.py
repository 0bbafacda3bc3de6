"""A real Prometheus (Debian's `prometheus` binary) on a free loopback port, for one test."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.helpers.ports import free_port


def prometheus_binary() -> str:
    """The binary; a skip (a failure under the test command) when it is not installed."""
    found = shutil.which("prometheus")
    if found is not None:
        return found
    reason = "prometheus is not installed (scripts/bootstrap-system.sh installs it)"
    if os.environ.get("VCG_REQUIRE_ALL") == "1" or os.environ.get("CI"):
        pytest.fail(reason, pytrace=False)
    pytest.skip(reason)


class PrometheusServer:
    """Runs Prometheus with a given config until `stop()`."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="vcg-prometheus-"))
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config_file = self.dir / "prometheus.yml"
        config_file.write_text(yaml.safe_dump(config))
        self.log = (self.dir / "prometheus.log").open("w")
        self.process = subprocess.Popen(
            [
                prometheus_binary(),
                f"--config.file={config_file}",
                f"--storage.tsdb.path={self.dir / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--log.level=warn",
            ],
            stdin=subprocess.DEVNULL,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )

    async def wait_ready(self, timeout_s: float = 30.0) -> None:
        """Until /-/ready answers 200."""
        deadline = time.monotonic() + timeout_s
        async with httpx.AsyncClient() as client:
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    raise AssertionError(f"prometheus exited: {self.logs()}")
                try:
                    if (await client.get(f"{self.url}/-/ready")).status_code == 200:
                        return
                except httpx.TransportError:
                    pass
                await asyncio.sleep(0.1)
        raise AssertionError(f"prometheus not ready: {self.logs()}")

    async def query(self, expr: str) -> list[dict[str, Any]]:
        """An instant query at now; the result vector (or scalar) list."""
        async with httpx.AsyncClient() as client:
            response = await client.get(f"{self.url}/api/v1/query", params={"query": expr})
        body = response.json()
        assert response.status_code == 200, (expr, body)
        assert body["status"] == "success", (expr, body)
        data = body["data"]
        if data["resultType"] in ("scalar", "string"):
            return [{"metric": {}, "value": data["result"]}]
        return list(data["result"])

    async def label_values(self, label: str, match: str) -> list[str]:
        """Values of `label` on series matching `match`."""
        async with httpx.AsyncClient() as client:
            response = await client.get(
                f"{self.url}/api/v1/label/{label}/values", params={"match[]": match}
            )
        body = response.json()
        assert body["status"] == "success", body
        return list(body["data"])

    def logs(self) -> str:
        """What Prometheus logged."""
        self.log.flush()
        return (self.dir / "prometheus.log").read_text()[-4000:]

    def stop(self) -> None:
        """Terminate and clean up."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()
        shutil.rmtree(self.dir, ignore_errors=True)
