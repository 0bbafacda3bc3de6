"""httpx vs aiohttp as the gateway's upstream HTTP client, measured against the simulator.

One process (uvloop, as the gateway runs) drives the engine simulator (`--tokens-per-second 0`,
a separate process on a free 127.0.0.1 port) with the request mix of the gateway's hot path:

- ``chat``:   POST /v1/chat/completions (non-streamed, max_tokens 16), body read whole;
- ``stream``: POST /v1/chat/completions (stream, ignore_eos, max_tokens 64), read chunk by chunk.

at concurrency 1, 16, 64 and 256 (closed loop, each worker sends its next request when the last
one is done). Clients:

- ``httpx``        httpx.AsyncClient configured as gateway/app.py (max_connections 512,
                   max_keepalive_connections 128, trust_env False);
- ``httpx-ka512``  the same with max_keepalive_connections 512 (isolates the keep-alive cap,
                   which above 128 concurrent requests makes httpx close and reopen connections);
- ``aiohttp``      aiohttp.ClientSession, TCPConnector(limit=512), keep-alive on.

For streams, ``raw`` reads transport chunks (httpx ``aiter_raw``, aiohttp ``iter_any``);
``sse`` also splits the chunks into events the way a relay must: httpx + httpx_sse
``EventSource.aiter_sse`` (what gateway/proxy/upstream.py does today) vs aiohttp reading lines
(``async for line in response.content``) and assembling ``data:`` events.

Runs are interleaved (round 1: A B C, round 2: C B A, ...) so drift hits every client. Besides
requests/s and latency p50/p99, the client process's own CPU time per request is reported: the
simulator shares the 2 cores, so req/s can be capped by it, while CPU/request is what the client
costs the gateway. Bounded by --rounds x --duration; everything it starts stops with it.

    .venv/bin/python bench/upstream_clients.py [--rounds 3] [--duration 1.2] [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parent.parent
CHAT_TOKENS = 16
STREAM_TOKENS = 64
CONCURRENCY = (1, 16, 64, 256)
HEADERS = {"content-type": "application/json"}


def body(stream: bool) -> bytes:
    """A chat request body."""
    tokens = STREAM_TOKENS if stream else CHAT_TOKENS
    return (
        b'{"model":"bench","messages":[{"role":"user","content":"benchmark the upstream client"}],'
        b'"max_tokens":%d,"ignore_eos":true,"stream":%s}'
        % (tokens, b"true" if stream else b"false")
    )


# -- processes ---------------------------------------------------------------------------------


def free_port() -> int:
    """A free loopback port."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _die_with_parent() -> None:
    """In the child: get SIGTERM when the benchmark dies, however it dies (Linux prctl)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds used so far by a process (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def start_simulator(port: int, log: Path) -> subprocess.Popen[bytes]:
    """The simulator as the fast upstream."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    with log.open("wb") as out:
        return subprocess.Popen(
            [
                sys.executable, "-m", "simulator", "--host", "127.0.0.1",
                "--port", str(port), "--model", "bench", "--tokens-per-second", "0",
                "--log-level", "warning",
            ],
            cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True, preexec_fn=_die_with_parent,
        )  # fmt: skip


def stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM the process group, SIGKILL after 5 s."""
    if proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=5)


def wait_healthy(url: str, proc: subprocess.Popen[bytes], timeout_s: float = 30) -> None:
    """Poll until `url` answers 200."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{url}: process exited with {proc.returncode}")
        with contextlib.suppress(httpx.TransportError):
            if httpx.get(url, timeout=1, trust_env=False).status_code == 200:
                return
        time.sleep(0.05)
    raise SystemExit(f"{url} did not become ready in {timeout_s:g}s")


# -- clients -----------------------------------------------------------------------------------

# Each client offers chat(url, body) and stream(url, body) -> number of SSE events read.


class HttpxClient:
    """httpx.AsyncClient as gateway/app.py builds it."""

    def __init__(self, keepalive: int) -> None:
        limits = httpx.Limits(max_connections=512, max_keepalive_connections=keepalive)
        timeout = httpx.Timeout(connect=5.0, read=60.0, write=30.0, pool=5.0)
        self.http = httpx.AsyncClient(limits=limits, timeout=timeout, trust_env=False)

    async def chat(self, url: str, content: bytes) -> None:
        response = await self.http.post(url, content=content, headers=HEADERS)
        if response.status_code != 200 or not response.content:
            raise RuntimeError(f"status {response.status_code}")

    async def stream_raw(self, url: str, content: bytes) -> int:
        events, tail = 0, b""
        request = self.http.build_request("POST", url, content=content, headers=HEADERS)
        response = await self.http.send(request, stream=True)
        try:
            async for chunk in response.aiter_raw():
                events += (tail + chunk).count(b"\n\n")
                tail = chunk[-1:]
        finally:
            await response.aclose()
        return events

    async def stream_sse(self, url: str, content: bytes) -> int:
        from httpx_sse import EventSource

        events = 0
        request = self.http.build_request("POST", url, content=content, headers=HEADERS)
        response = await self.http.send(request, stream=True)
        try:
            async for event in EventSource(response).aiter_sse():
                event.data.encode()  # the relay re-encodes each event's data
                events += 1
        finally:
            await response.aclose()
        return events

    async def aclose(self) -> None:
        await self.http.aclose()


class AiohttpClient:
    """aiohttp.ClientSession with a 512-connection keep-alive pool."""

    def __init__(self) -> None:
        import aiohttp

        connector = aiohttp.TCPConnector(limit=512, limit_per_host=0, keepalive_timeout=60)
        timeout = aiohttp.ClientTimeout(total=None, connect=5.0, sock_read=60.0)
        self.http = aiohttp.ClientSession(
            connector=connector, timeout=timeout, auto_decompress=False, trust_env=False
        )

    async def chat(self, url: str, content: bytes) -> None:
        async with self.http.post(url, data=content, headers=HEADERS) as response:
            data = await response.read()
            if response.status != 200 or not data:
                raise RuntimeError(f"status {response.status}")

    async def stream_raw(self, url: str, content: bytes) -> int:
        events, tail = 0, b""
        async with self.http.post(url, data=content, headers=HEADERS) as response:
            async for chunk in response.content.iter_any():
                events += (tail + chunk).count(b"\n\n")
                tail = chunk[-1:]
        return events

    async def stream_sse(self, url: str, content: bytes) -> int:
        # Minimal SSE: `data:` lines joined by \n, dispatched on the blank line.
        events = 0
        data: list[bytes] = []
        async with self.http.post(url, data=content, headers=HEADERS) as response:
            async for line in response.content:
                line = line.rstrip(b"\r\n")
                if not line:
                    if data:
                        b"\n".join(data)
                        events += 1
                        data = []
                elif line.startswith(b"data:"):
                    value = line[5:]
                    data.append(value[1:] if value.startswith(b" ") else value)
        return events

    async def aclose(self) -> None:
        await self.http.close()


def make_client(name: str) -> Any:
    """A client by benchmark name."""
    if name == "httpx":
        return HttpxClient(keepalive=128)
    if name == "httpx-ka512":
        return HttpxClient(keepalive=512)
    return AiohttpClient()


# -- measuring ---------------------------------------------------------------------------------


@dataclass
class Sample:
    """One client x mode x concurrency, pooled over rounds."""

    requests: int = 0  # completed inside the measuring window
    errors: int = 0
    seconds: float = 0.0  # window length
    completed: int = 0  # all completed, including those that finished after the window
    elapsed: float = 0.0  # until the last worker stopped (CPU shares are over this)
    client_cpu: float = 0.0
    sim_cpu: float = 0.0
    latencies: list[float] = field(default_factory=list)
    rates: list[float] = field(default_factory=list)

    def add(self, other: Sample) -> None:
        """Pool another round into this one."""
        self.requests += other.requests
        self.errors += other.errors
        self.seconds += other.seconds
        self.completed += other.completed
        self.elapsed += other.elapsed
        self.client_cpu += other.client_cpu
        self.sim_cpu += other.sim_cpu
        self.latencies += other.latencies
        self.rates.append(other.requests / other.seconds)

    @property
    def rate(self) -> float:
        """Requests per second inside the windows."""
        return self.requests / self.seconds if self.seconds else 0.0

    @property
    def cpu_per_request_us(self) -> float:
        """Client CPU microseconds per completed request."""
        return self.client_cpu / max(self.completed, 1) * 1e6


async def closed_loop(
    call: Callable[[], Awaitable[Any]], check: Callable[[Any], bool],
    concurrency: int, duration: float, sim_pid: int,
) -> Sample:  # fmt: skip
    """`concurrency` workers calling back to back; rates count requests done within the window."""
    sample = Sample()

    async def worker() -> None:
        while (begun := time.perf_counter()) < deadline:
            try:
                ok = check(await call())
            except Exception:
                ok = False
            done = time.perf_counter()
            sample.completed += ok
            if done > deadline:
                return
            if ok:
                sample.requests += 1
                sample.latencies.append(done - begun)
            else:
                sample.errors += 1

    cpu0, sim0 = time.process_time(), cpu_seconds(sim_pid)
    started = time.perf_counter()
    deadline = started + duration
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    sample.elapsed = time.perf_counter() - started
    sample.client_cpu = time.process_time() - cpu0
    sample.sim_cpu = cpu_seconds(sim_pid) - sim0
    sample.seconds = duration
    return sample


def pct(values: list[float], q: float) -> float:
    """The q-quantile in ms (nearest rank)."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000


VARIANTS: dict[str, list[tuple[str, str]]] = {
    # mode: [(label, client name)]
    "chat": [("httpx", "httpx"), ("httpx-ka512", "httpx-ka512"), ("aiohttp", "aiohttp")],
    "stream raw": [("httpx", "httpx"), ("aiohttp", "aiohttp")],
    "stream sse": [("httpx+httpx_sse", "httpx"), ("aiohttp lines", "aiohttp")],
}
AFTER_BURST = "1 after burst"  # c=1 right after a burst of 256 concurrent requests


def _call(client: Any, mode: str, url: str) -> tuple[Callable[[], Awaitable[Any]], Any]:
    if mode == "chat":
        chat_body = body(False)
        return (lambda: client.chat(url, chat_body)), _ok
    stream_body = body(True)
    if mode == "stream raw":
        return (lambda: client.stream_raw(url, stream_body)), _complete
    return (lambda: client.stream_sse(url, stream_body)), _complete


async def cell(
    name: str, mode: str, url: str, concurrency: int | str, duration: float, sim_pid: int
) -> Sample:
    """A fresh client, warmed at the cell's concurrency (its pool at steady state), measured."""
    client = make_client(name)
    try:
        call, check = _call(client, mode, url)
        warm = 256 if concurrency == AFTER_BURST else int(concurrency)
        await closed_loop(call, check, warm, 0.25, sim_pid)
        level = 1 if concurrency == AFTER_BURST else int(concurrency)
        return await closed_loop(call, check, level, duration, sim_pid)
    finally:
        await client.aclose()


def cells(args: argparse.Namespace) -> list[tuple[str, int | str]]:
    """(mode, concurrency) in run order."""
    order: list[tuple[str, int | str]] = []
    for concurrency in args.concurrency:
        order += [(mode, concurrency) for mode in VARIANTS]
    if args.after_burst:
        order.append(("chat", AFTER_BURST))
    return order


async def measure(
    args: argparse.Namespace, base: str, sim_pid: int
) -> dict[tuple[str, str, int | str], Sample]:
    """All rounds of all variants; pooled samples keyed (mode, label, concurrency)."""
    url = base + "/v1/chat/completions"
    results: dict[tuple[str, str, int | str], Sample] = {}
    for mode, concurrency in cells(args):
        variants = VARIANTS[mode]
        for round_no in range(args.rounds):
            for label, name in variants if round_no % 2 == 0 else variants[::-1]:
                sample = await cell(name, mode, url, concurrency, args.duration, sim_pid)
                results.setdefault((mode, label, concurrency), Sample()).add(sample)
    return results


def _ok(_: Any) -> bool:
    return True


def _complete(events: int) -> bool:
    return bool(events == STREAM_TOKENS + 3)  # role chunk + tokens + finish chunk + [DONE]


def report(results: dict[tuple[str, str, int | str], Sample], args: argparse.Namespace) -> None:
    """Print one table per mode and the aiohttp/httpx ratios."""
    print(
        f"\nupstream client benchmark: simulator --tokens-per-second 0, {os.cpu_count()} CPUs, "
        f"{args.rounds} interleaved rounds x {args.duration:g}s per cell, uvloop, a fresh client "
        "per cell warmed at its concurrency"
    )
    print(f"chat = non-streamed, max_tokens {CHAT_TOKENS}; stream = max_tokens {STREAM_TOKENS}")
    header = (
        f"{'mode':<11}{'client':<17}{'conc':>14}{'req/s':>8}{'(min-max)':>14}{'p50 ms':>8}"
        f"{'p99 ms':>9}{'cli CPU':>8}{'cli us/req':>11}{'sim CPU':>8}{'err':>5}"
    )
    order = cells(args)
    for mode, variants in VARIANTS.items():
        print("\n" + header)
        print("-" * len(header))
        for concurrency in (c for m, c in order if m == mode):
            for label, _ in variants:
                s = results[(mode, label, concurrency)]
                spread = f"({min(s.rates):.0f}-{max(s.rates):.0f})"
                p50 = f"{pct(s.latencies, 0.5):.2f}" if s.latencies else "-"
                p99 = f"{pct(s.latencies, 0.99):.2f}" if s.latencies else "-"
                print(
                    f"{mode:<11}{label:<17}{concurrency!s:>14}{s.rate:>8.0f}{spread:>14}"
                    f"{p50:>8}{p99:>9}{s.client_cpu / s.elapsed:>8.0%}{s.cpu_per_request_us:>11.0f}"
                    f"{s.sim_cpu / s.elapsed:>8.0%}{s.errors:>5}"
                )
    print("\naiohttp vs httpx (as gateway/app.py configures it): aiohttp/httpx ratios")
    pairs = [("chat", "aiohttp", "httpx"), ("stream raw", "aiohttp", "httpx"),
             ("stream sse", "aiohttp lines", "httpx+httpx_sse")]  # fmt: skip
    for mode, a, h in pairs:
        for concurrency in (c for m, c in order if m == mode):
            sa, sh = results[(mode, a, concurrency)], results[(mode, h, concurrency)]
            cpu = sa.cpu_per_request_us / sh.cpu_per_request_us
            if not sh.requests:
                print(
                    f"  {mode:<11} c={concurrency!s:<14} httpx finished no request inside the "
                    f"window; client CPU/request x{cpu:.2f}"
                )
                continue
            rps = sa.rate / sh.rate
            p50x = pct(sa.latencies, 0.5) / pct(sh.latencies, 0.5)
            p99x = pct(sa.latencies, 0.99) / pct(sh.latencies, 0.99)
            print(
                f"  {mode:<11} c={concurrency!s:<14} req/s x{rps:<6.2f} p50 x{p50x:<5.2f} "
                f"p99 x{p99x:<5.2f} client CPU/request x{cpu:.2f}"
            )
    print(
        "\ncli CPU / sim CPU: share of one core used by this client process / by the simulator."
        "\nWhere the simulator is near 100% it was the bottleneck: compare cli us/req, not req/s."
        f"\n'{AFTER_BURST}': sequential requests on a client whose pool a burst just filled."
    )


def main() -> None:
    """Start the simulator, measure, print, clean up."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=1.2, help="seconds per cell and round")
    parser.add_argument("--concurrency", type=int, nargs="+", default=list(CONCURRENCY))
    parser.add_argument(
        "--no-after-burst", dest="after_burst", action="store_false",
        help="skip the c=1-right-after-a-burst cell",
    )  # fmt: skip
    parser.add_argument("--quick", action="store_true", help="1 round of 0.8s (about 45s)")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.duration = 1, 0.8
    try:
        import aiohttp  # noqa: F401
    except ImportError:
        raise SystemExit(
            "aiohttp is needed for this comparison: .venv/bin/pip install aiohttp"
        ) from None
    runs = sum(len(VARIANTS[mode]) for mode, _ in cells(args)) * args.rounds
    budget = int(runs * (args.duration + 2.0) + 60)

    def on_signal(signum: int, _frame: Any) -> None:
        raise SystemExit(f"stopped by signal {signum}")

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGALRM, on_signal)
    signal.alarm(budget)  # a hard stop, whatever hangs
    workdir = tempfile.TemporaryDirectory(prefix="bench-upstream-")
    port = free_port()
    sim = start_simulator(port, Path(workdir.name) / "simulator.log")
    load_before = os.getloadavg()
    try:
        wait_healthy(f"http://127.0.0.1:{port}/health", sim)
        with contextlib.suppress(ImportError):
            import uvloop

            asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
        results = asyncio.run(measure(args, f"http://127.0.0.1:{port}", sim.pid))
    finally:
        signal.alarm(0)
        stop(sim)
        workdir.cleanup()
    report(results, args)
    print(
        f"load average (1 min) before/after: {load_before[0]:.2f} / {os.getloadavg()[0]:.2f} "
        f"on {os.cpu_count()} CPUs (other work on the machine shows up here)"
    )


if __name__ == "__main__":
    main()
