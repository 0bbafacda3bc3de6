"""Throughput of the vLLM engine simulator: streamed tokens/s and requests/s.

Starts ``python -m simulator`` on a free 127.0.0.1 port (``--tokens-per-second 0``),
then runs, each for ``--duration`` seconds, a single stream and ``--concurrency`` concurrent
streams (and the same two for non-streamed requests) with httpx, and prints a table. The
simulator's own CPU use is read from /proc, so one can tell whether it or the client was the
bottleneck: a simulator well below 100% CPU was not.

    .venv/bin/python bench/bench_simulator.py [--duration 4] [--concurrency 32] [--max-tokens 256]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

REPO_ROOT = Path(__file__).resolve().parents[1]
TOTAL_BUDGET_S = 20.0


@dataclass
class Result:
    """What one scenario measured."""

    name: str
    concurrency: int
    requests: int = 0
    tokens: int = 0
    errors: int = 0
    elapsed: float = 0.0
    ttfts: list[float] = field(default_factory=list)
    server_cpu: float | None = None


def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds used so far by ``pid`` (Linux /proc), else ``None``."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    ticks = os.sysconf("SC_CLK_TCK")
    return (int(fields[11]) + int(fields[12])) / ticks


async def stream_worker(
    client: httpx.AsyncClient, body: bytes, max_tokens: int, deadline: float, result: Result
) -> None:
    """Run streamed chat requests back to back until ``deadline``."""
    while time.perf_counter() < deadline:
        started = time.perf_counter()
        events = 0
        first: float | None = None
        tail = b""
        async with client.stream("POST", "/v1/chat/completions", content=body) as response:
            async for chunk in response.aiter_raw():
                if first is None:
                    first = time.perf_counter()
                data = tail + chunk
                events += data.count(b"\n\n") - tail.count(b"\n\n")
                tail = data[-1:]
        # role chunk + tokens + finish chunk + [DONE]
        if events == max_tokens + 3:
            result.requests += 1
            result.tokens += max_tokens
            if first is not None:
                result.ttfts.append(first - started)
        else:
            result.errors += 1


async def plain_worker(
    client: httpx.AsyncClient, body: bytes, max_tokens: int, deadline: float, result: Result
) -> None:
    """Run non-streamed chat requests back to back until ``deadline``."""
    while time.perf_counter() < deadline:
        started = time.perf_counter()
        response = await client.post("/v1/chat/completions", content=body)
        if response.status_code == 200:
            result.requests += 1
            result.tokens += max_tokens
            result.ttfts.append(time.perf_counter() - started)
        else:
            result.errors += 1


async def run_scenario(
    base_url: str, pid: int, name: str, concurrency: int, stream: bool, args: argparse.Namespace
) -> Result:
    """Run one scenario for ``args.duration`` seconds and return its measurements."""
    max_tokens = args.max_tokens if stream else 16
    body = (
        b'{"model":"bench","messages":[{"role":"user","content":"benchmark the simulator"}],'
        b'"max_tokens":%d,"ignore_eos":true,"stream":%s}'
        % (max_tokens, b"true" if stream else b"false")
    )
    result = Result(name, concurrency)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=base_url, limits=limits, timeout=30.0) as client:
        await client.get("/health")
        cpu_before = cpu_seconds(pid)
        started = time.perf_counter()
        deadline = started + args.duration
        worker = stream_worker if stream else plain_worker
        await asyncio.gather(
            *(worker(client, body, max_tokens, deadline, result) for _ in range(concurrency))
        )
        result.elapsed = time.perf_counter() - started
        cpu_after = cpu_seconds(pid)
    if cpu_before is not None and cpu_after is not None:
        result.server_cpu = (cpu_after - cpu_before) / result.elapsed
    return result


def start_simulator(port: int) -> subprocess.Popen[bytes]:
    """Start the simulator process and wait until it is healthy."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    proc = subprocess.Popen(
        [
            sys.executable, "-m", "simulator", "--host", "127.0.0.1",
            "--port", str(port), "--model", "bench", "--tokens-per-second", "0",
            "--log-level", "warning",
        ],
        cwd=REPO_ROOT,
        env=env,
    )  # fmt: skip
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"simulator exited with {proc.returncode}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.TransportError:
            time.sleep(0.05)
    proc.kill()
    raise SystemExit("simulator did not become healthy")


def print_table(results: list[Result]) -> None:
    """Print the measurements as a fixed-width table."""
    header = (
        f"{'scenario':<22}{'conc':>5}{'requests':>10}{'req/s':>10}{'tokens/s':>12}"
        f"{'p50 ms':>9}{'errors':>8}{'sim CPU':>9}"
    )
    print(header)
    print("-" * len(header))
    for r in results:
        p50 = statistics.median(r.ttfts) * 1000 if r.ttfts else float("nan")
        cpu = f"{r.server_cpu * 100:.0f}%" if r.server_cpu is not None else "n/a"
        print(
            f"{r.name:<22}{r.concurrency:>5}{r.requests:>10}{r.requests / r.elapsed:>10.1f}"
            f"{r.tokens / r.elapsed:>12.0f}{p50:>9.2f}{r.errors:>8}{cpu:>9}"
        )
    print(
        "\np50 ms: time to first byte for streams, full latency for non-streamed requests."
        "\nsim CPU: the simulator process's CPU use during the scenario (100% = one core)."
    )


async def main_async(args: argparse.Namespace) -> int:
    """Start the simulator, run the scenarios, print the table."""
    port = free_port()
    proc = start_simulator(port)
    base_url = f"http://127.0.0.1:{port}"
    try:
        scenarios = [
            ("stream x1", 1, True),
            (f"stream x{args.concurrency}", args.concurrency, True),
            ("non-stream x1", 1, False),
            (f"non-stream x{args.concurrency}", args.concurrency, False),
        ]
        results = [
            await run_scenario(base_url, proc.pid, name, conc, stream, args)
            for name, conc, stream in scenarios
        ]
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    print(
        f"vLLM engine SIMULATOR benchmark: {args.duration:g}s per scenario, "
        f"max_tokens={args.max_tokens} per stream, httpx client, {os.cpu_count()} CPUs\n"
    )
    print_table(results)
    return 0 if all(r.errors == 0 for r in results) else 1


def main() -> int:
    """Parse arguments (total time bounded to 20 s) and run the benchmark."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=4.0, help="seconds per scenario")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=256)
    args = parser.parse_args()
    args.duration = max(0.5, min(args.duration, (TOTAL_BUDGET_S - 2.0) / 4))
    return asyncio.run(main_async(args))


if __name__ == "__main__":
    sys.exit(main())
