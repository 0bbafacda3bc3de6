"""Proxy benchmark: the same requests sent straight to the engine simulator vs through the gateway.

Starts, on free 127.0.0.1 ports, the engine simulator (`--tokens-per-second 0`, the fast
upstream) and the gateway as a real process (`python -m gateway serve`: uvicorn, uvloop,
httptools) with ENGINE=external pointing at it, a high MAX_QUEUE_SIZE (the local concurrency
limit must not throttle the benchmark), a temporary SQLite database and state directory. Then,
in the same run and interleaved (A B, B A, A B, ... so drift and noise hit both sides), it
measures:

- latency at concurrency 1 (non-streamed chat, max_tokens 16): added p50/p99 (target: p50 <= +1 ms);
  once with a quiet upstream pool and once right after a burst of 64 concurrent requests;
- requests/s at concurrency 16 and 64 (non-streamed): gateway/direct;
- 64 concurrent streams (max_tokens 64, ignore_eos): time to first token p50 and aggregate
  tokens/s (target: ratio >= 0.95), against the fast simulator and against a paced one
  (--paced-tps tokens/s per stream, closer to a real engine);
- the cost of each feature (FEATURES: a name and its environment overrides): a gateway with the
  feature on against the baseline gateway with everything off (BASELINE_ENV), latency c=1 and
  req/s c=64 and gateway CPU per request. Features not built yet print "n/a (not built yet)".

The load generator runs in this process on uvloop with aiohttp (5-50x less CPU per request than
httpx here, see bench/upstream_clients.py), and the CPU time of every process is read from /proc,
so one can see who was busy. On a small machine the gateway competes for the same cores as the
simulator and the load generator: CPU microseconds per request are the portable numbers.
With --profile (or --profile-only), py-spy samples the baseline gateway under load (chat c=1,
chat c=64, 64 streams) and prints where its time goes, by concern and by function.
--gateway-cmd serves the gateways with another command (same environment) to A/B a prototype.

    .venv/bin/python bench/proxy.py [--quick] [--rounds 4] [--duration 2] [--profile]

Loopback only; every process it starts is stopped on exit, Ctrl-C, error, or a hard deadline,
and dies with this process (PR_SET_PDEATHSIG) should it be killed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import os
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from gateway.settings import Settings  # noqa: E402

MODEL = "bench-model"
CHAT_TOKENS = 16
STREAM_TOKENS = 64
HEADERS = {"content-type": "application/json"}


@dataclass(frozen=True)
class Feature:
    """A gateway feature as a named configuration: environment overrides (None: not built)."""

    name: str
    env: dict[str, str] | None
    api_key: bool = False  # requests carry a user's API key (created through the admin API)
    jwt: bool = False  # requests carry a user's access token (the user logs in first)
    note: str = ""

    @property
    def built(self) -> bool:
        """Whether the feature exists yet."""
        return self.env is not None


_TIERS = ("FREE", "STANDARD", "PREMIUM")
_HIGH = "60000000"  # per minute: the highest a rule accepts (window_s * 1e6); never reached here
# The baseline gateway: every feature that can be switched off is off. (A setting the gateway
# does not know is ignored; usage recording cannot be switched off and is part of it.)
BASELINE_ENV = {
    "LOG_LEVEL": "WARNING",
    "METRICS_ENABLED": "false",
    "USAGE_ENABLED": "false",
    "REQUIRE_AUTH": "false",
    "RATE_LIMIT_REQUESTS": "0",
    **{f"RATE_LIMIT_{t}_{w}": "0" for t in _TIERS for w in ("PER_MINUTE", "PER_HOUR")},
    **{f"RATE_LIMIT_{t}_TOKENS_PER_MINUTE": "0" for t in _TIERS},
}
_LIMITS_ON = {
    "RATE_LIMIT_REQUESTS": _HIGH,
    "RATE_LIMIT_WINDOW": "60",
    **{f"RATE_LIMIT_{t}_PER_MINUTE": _HIGH for t in _TIERS},
    **{f"RATE_LIMIT_{t}_TOKENS_PER_MINUTE": _HIGH for t in _TIERS},
}
_LOGGING_ON = {"LOG_LEVEL": "INFO", "LOG_FORMAT": "json"}
_USAGE_ON = {"USAGE_ENABLED": "true"}
_METRICS_ON = {"METRICS_ENABLED": "true"}
# Each built feature is measured as a gateway with these overrides vs the baseline.
FEATURES = (
    Feature("logging", _LOGGING_ON, note="one JSON line per request, to a file"),
    Feature("auth", {"REQUIRE_AUTH": "true"}, api_key=True, note="a premium user's API key"),
    Feature(
        "auth jwt", {"REQUIRE_AUTH": "true"}, jwt=True, note="a premium user's access token (JWT)"
    ),
    Feature("limits", _LIMITS_ON, note="request + token limits, local limiter, never hit"),
    Feature("metrics", _METRICS_ON, note="Prometheus series per request (/metrics)"),
    Feature("usage", _USAGE_ON, note="a usage row per request, batched into SQLite"),
    Feature(
        "all built",
        {**_LOGGING_ON, "REQUIRE_AUTH": "true", **_LIMITS_ON, **_METRICS_ON, **_USAGE_ON},
        api_key=True,
        note="logging + auth + limits + metrics + usage",
    ),
)


def chat_body(stream: bool) -> bytes:
    """A chat request body (the same bytes for both sides)."""
    tokens = STREAM_TOKENS if stream else CHAT_TOKENS
    return (
        b'{"model":"%s","messages":[{"role":"user","content":"benchmark the proxy path"}],'
        b'"max_tokens":%d,"ignore_eos":true,"stream":%s}'
        % (MODEL.encode(), tokens, b"true" if stream else b"false")
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
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass
class Server:
    """One process this benchmark started."""

    name: str
    port: int
    proc: subprocess.Popen[bytes]
    log: Path
    ready_path: str

    @property
    def base(self) -> str:
        """Its base URL."""
        return f"http://127.0.0.1:{self.port}"


class Cluster:
    """Starts the simulators and gateways; stops all of them, whatever happens."""

    def __init__(self, workdir: Path, gateway_argv: list[str] | None = None) -> None:
        self.workdir = workdir
        self.gateway_argv = gateway_argv or [sys.executable, "-m", "gateway", "serve"]
        self.servers: list[Server] = []
        # Every gateway gets the same break-glass admin key: it creates API keys for features.
        self.admin_key = "sk-admin-bench-" + secrets.token_urlsafe(24)

    def _spawn(self, name: str, argv: list[str], env: dict[str, str], ready: str) -> Server:
        port = int(argv[argv.index("--port") + 1]) if "--port" in argv else int(env["PORT"])
        log = self.workdir / f"{name}.log"
        cwd = self.workdir / name
        cwd.mkdir()
        with log.open("wb") as out:
            proc = subprocess.Popen(
                argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=out,
                stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=_die_with_parent,
            )  # fmt: skip
        server = Server(name, port, proc, log, ready)
        self.servers.append(server)
        return server

    def simulator(self, name: str, tokens_per_second: float) -> Server:
        """The engine simulator on a free port."""
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        argv = [
            sys.executable, "-m", "simulator", "--host", "127.0.0.1",
            "--port", str(free_port()), "--model", MODEL,
            "--tokens-per-second", f"{tokens_per_second:g}", "--log-level", "warning",
        ]  # fmt: skip
        return self._spawn(name, argv, env, "/health")

    def gateway(self, name: str, upstream: Server, overrides: dict[str, str]) -> Server:
        """The gateway, as `vllm-gateway serve` runs it, in front of `upstream`."""
        env = {k: v for k, v in os.environ.items() if k not in Settings.model_fields}
        state = self.workdir / name / "state"
        env.update(
            PYTHONPATH=str(REPO),
            ENVIRONMENT="development",
            HOST="127.0.0.1",
            PORT=str(free_port()),
            ENGINE="external",
            VLLM_BASE_URL=f"{upstream.base}/v1",
            MAX_QUEUE_SIZE="256",
            LOG_LEVEL="WARNING",
            DATABASE_URL=f"sqlite:///{self.workdir / name / 'gateway.db'}",
            STATE_DIR=str(state),
            MODEL_PROFILES=str(REPO / "model_profiles.yml"),
            ADMIN_API_KEY=self.admin_key,
        )
        env.update(overrides)
        return self._spawn(name, list(self.gateway_argv), env, "/health/ready")

    def api_key(self, gateway: Server) -> str:
        """A premium user's API key on `gateway`, created with the admin key."""
        response = httpx.post(
            gateway.base + "/admin/api/keys",
            json={"user_id": "bench", "tier": "premium", "description": "bench/proxy.py"},
            headers={"authorization": f"Bearer {self.admin_key}"},
            timeout=10,
            trust_env=False,
        )
        if response.status_code != 201:
            raise ValueError(f"HTTP {response.status_code}: {response.text[:200]}")
        key: str = response.json()["key"]
        return key

    def access_token(self, gateway: Server) -> str:
        """An access token (JWT) of a premium user on `gateway`: the user is created with the
        admin key, then logs in as a web UI or JWT client does."""
        password = secrets.token_urlsafe(18)
        created = httpx.post(
            gateway.base + "/admin/api/users",
            json={"username": "bench-jwt", "password": password, "tier": "premium"},
            headers={"authorization": f"Bearer {self.admin_key}"},
            timeout=10,
            trust_env=False,
        )
        if created.status_code != 201:
            raise ValueError(f"HTTP {created.status_code}: {created.text[:200]}")
        logged_in = httpx.post(
            gateway.base + "/api/auth/login",
            json={"username": "bench-jwt", "password": password},
            timeout=10,
            trust_env=False,
        )
        if logged_in.status_code != 200:
            raise ValueError(f"HTTP {logged_in.status_code}: {logged_in.text[:200]}")
        token: str = logged_in.json()["access_token"]
        return token

    def wait_ready(self, timeout_s: float = 60) -> None:
        """Poll every server's readiness URL until all answer 200."""
        deadline = time.monotonic() + timeout_s
        pending = list(self.servers)
        with httpx.Client(timeout=2, trust_env=False) as client:
            while pending:
                server = pending[0]
                if server.proc.poll() is not None:
                    tail = server.log.read_text(errors="replace")[-2000:]
                    raise SystemExit(f"{server.name} exited ({server.proc.returncode}):\n{tail}")
                with contextlib.suppress(httpx.TransportError):
                    if client.get(server.base + server.ready_path).status_code == 200:
                        pending.pop(0)
                        continue
                if time.monotonic() > deadline:
                    raise SystemExit(f"{server.name} was not ready in {timeout_s:g}s")
                time.sleep(0.05)

    def stop_all(self) -> None:
        """SIGTERM every process group, SIGKILL what is left after 5 s."""
        for server in self.servers:
            if server.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(server.proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + 5
        for server in self.servers:
            try:
                server.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(server.proc.pid, signal.SIGKILL)
                server.proc.wait(timeout=5)


# -- load generator ----------------------------------------------------------------------------


class Load:
    """The load generator's client for one target: aiohttp (default) or httpx."""

    def __init__(self, kind: str, server: Server, extra_headers: dict[str, str]) -> None:
        self.kind = kind
        self.server = server
        self.url = server.base + "/v1/chat/completions"
        self.headers = {**HEADERS, **extra_headers}
        self.sent = 0
        self.first_error = ""
        if kind == "aiohttp":
            import aiohttp

            connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=60)
            self.session: Any = aiohttp.ClientSession(
                connector=connector, auto_decompress=False, trust_env=False,
                timeout=aiohttp.ClientTimeout(total=60),
            )  # fmt: skip
        else:
            limits = httpx.Limits(max_connections=1024, max_keepalive_connections=1024)
            self.session = httpx.AsyncClient(limits=limits, timeout=60, trust_env=False)

    async def chat(self, body: bytes) -> bool:
        """One non-streamed request; True when it succeeded."""
        self.sent += 1
        if self.kind == "aiohttp":
            async with self.session.post(self.url, data=body, headers=self.headers) as response:
                data = await response.read()
                return self._ok(response.status, data)
        response = await self.session.post(self.url, content=body, headers=self.headers)
        return self._ok(response.status_code, response.content)

    def _ok(self, status: int, data: bytes) -> bool:
        if status == 200 and data:
            return True
        if not self.first_error:
            self.first_error = f"HTTP {status}: {data[:300].decode(errors='replace')}"
        return False

    async def stream(self, body: bytes, deadline: float) -> tuple[bool, int, float | None]:
        """One stream: (complete, tokens that arrived before `deadline`, time to first token)."""
        self.sent += 1
        started = time.perf_counter()
        events, in_window, ttft, tail = 0, 0, None, b""
        last_token = STREAM_TOKENS + 1  # event 1 is the role chunk, 2..65 are tokens

        def account(chunk: bytes) -> None:
            nonlocal events, in_window, ttft, tail
            new = (tail + chunk).count(b"\n\n")
            tail = chunk[-1:]
            if not new:
                return
            now = time.perf_counter()
            tokens = max(0, min(events + new, last_token) - max(events, 1))
            if ttft is None and events + new >= 2:
                ttft = now - started
            if now <= deadline:
                in_window += tokens
            events += new

        if self.kind == "aiohttp":
            async with self.session.post(self.url, data=body, headers=self.headers) as response:
                if response.status != 200:
                    return self._ok(response.status, await response.read()), 0, None
                async for chunk in response.content.iter_any():
                    account(chunk)
        else:
            async with self.session.stream(
                "POST", self.url, content=body, headers=self.headers
            ) as response:
                if response.status_code != 200:
                    return self._ok(response.status_code, await response.aread()), 0, None
                async for chunk in response.aiter_raw():
                    account(chunk)
        # role chunk + tokens + finish chunk + [DONE] (the gateway drops the usage chunk it added)
        complete = events == STREAM_TOKENS + 3
        if not complete and not self.first_error:
            self.first_error = f"stream ended after {events} events, not {STREAM_TOKENS + 3}"
        return complete, in_window, ttft

    async def aclose(self) -> None:
        """Close the pool."""
        if self.kind == "aiohttp":
            await self.session.close()
        else:
            await self.session.aclose()


# -- measuring ---------------------------------------------------------------------------------


@dataclass
class Sample:
    """One target in one scenario, pooled over rounds."""

    requests: int = 0  # completed inside the windows
    errors: int = 0
    seconds: float = 0.0  # sum of the windows
    elapsed: float = 0.0  # until the last worker stopped (CPU is measured over this)
    completed: int = 0  # including the requests that ended after the window
    tokens: int = 0  # stream tokens that arrived inside the windows
    latencies: list[float] = field(default_factory=list)
    ttfts: list[float] = field(default_factory=list)
    rates: list[float] = field(default_factory=list)
    cpu: dict[str, float] = field(default_factory=dict)  # process role -> CPU seconds

    def add(self, other: Sample) -> None:
        """Pool one more round."""
        self.requests += other.requests
        self.errors += other.errors
        self.seconds += other.seconds
        self.elapsed += other.elapsed
        self.completed += other.completed
        self.tokens += other.tokens
        self.latencies += other.latencies
        self.ttfts += other.ttfts
        self.rates.append((other.tokens or other.requests) / other.seconds)
        for role, seconds in other.cpu.items():
            self.cpu[role] = self.cpu.get(role, 0.0) + seconds

    @property
    def rate(self) -> float:
        """Requests per second inside the windows."""
        return self.requests / self.seconds if self.seconds else 0.0

    @property
    def token_rate(self) -> float:
        """Aggregate stream tokens per second inside the windows."""
        return self.tokens / self.seconds if self.seconds else 0.0

    def cpu_us(self, role: str) -> float:
        """CPU microseconds of one process per completed request."""
        return self.cpu.get(role, 0.0) / max(self.completed, 1) * 1e6


def pct(values: list[float], q: float) -> float:
    """The q-quantile in ms (nearest rank); nan when empty."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000


@dataclass
class Target:
    """Where a scenario sends its load, and which processes do the work there."""

    label: str
    load: Load
    pids: dict[str, int]  # role ("simulator", "gateway") -> pid


async def closed_loop(target: Target, concurrency: int, duration: float, stream: bool) -> Sample:
    """`concurrency` workers back to back for `duration` s; only in-window completions count."""
    sample = Sample(seconds=duration)
    body = chat_body(stream)

    async def worker() -> None:
        while (begun := time.perf_counter()) < deadline:
            try:
                if stream:
                    ok, tokens, ttft = await target.load.stream(body, deadline)
                else:
                    ok, tokens, ttft = await target.load.chat(body), 0, None
            except Exception:
                ok, tokens, ttft = False, 0, None
            done = time.perf_counter()
            sample.completed += ok
            sample.tokens += tokens
            if ttft is not None and ok:
                sample.ttfts.append(ttft)
            if done > deadline:
                return
            if ok:
                sample.requests += 1
                sample.latencies.append(done - begun)
            else:
                sample.errors += 1

    before = {role: cpu_seconds(pid) for role, pid in target.pids.items()}
    client0 = time.process_time()
    started = time.perf_counter()
    deadline = started + duration
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    sample.elapsed = time.perf_counter() - started
    sample.cpu["client"] = time.process_time() - client0
    for role, pid in target.pids.items():
        sample.cpu[role] = cpu_seconds(pid) - before[role]
    return sample


async def interleaved(
    targets: list[Target], rounds: int, concurrency: int, duration: float, stream: bool,
    burst_first: bool = False,
) -> dict[str, Sample]:  # fmt: skip
    """Rounds of A B / B A ...; with burst_first, each run follows a 0.3 s burst at c=64."""
    pooled = {t.label: Sample() for t in targets}
    for round_no in range(rounds):
        for target in targets if round_no % 2 == 0 else targets[::-1]:
            if burst_first:
                await closed_loop(target, 64, 0.3, stream=False)
            pooled[target.label].add(await closed_loop(target, concurrency, duration, stream))
    return pooled


# -- the run -----------------------------------------------------------------------------------


@dataclass
class Results:
    """Everything measured, by scenario and target label."""

    main: dict[str, dict[str, Sample]] = field(default_factory=dict)
    features: dict[str, dict[str, dict[str, Sample]]] = field(default_factory=dict)
    log_lines: dict[str, tuple[int, int]] = field(default_factory=dict)
    profile: list[str] = field(default_factory=list)
    errors: dict[str, str] = field(default_factory=dict)  # server -> first error seen
    skipped: dict[str, str] = field(default_factory=dict)  # feature -> why it was not measured


async def run(
    args: argparse.Namespace,
    cluster: Cluster,
    servers: dict[str, Server],
    feature_headers: dict[str, dict[str, str]],
) -> Results:
    """All scenarios, in an order that keeps the upstream pools' state comparable."""
    sim, gw = servers["sim"], servers["gateway"]
    loads: list[Load] = []

    def target(label: str, server: Server, upstream: Server, headers: dict[str, str]) -> Target:
        load = Load(args.client, server, headers)
        loads.append(load)
        pids = {"simulator": upstream.proc.pid}
        if server is not upstream:
            pids["gateway"] = server.proc.pid
        return Target(label, load, pids)

    direct = target("direct", sim, sim, {})
    through = target("gateway", gw, sim, {})
    features = [
        (f, target(f.name, servers[f"gw-{f.name}"], sim, feature_headers[f.name]))
        for f in FEATURES
        if f.name in feature_headers
    ]
    res = Results()
    d, rounds = args.duration, args.rounds
    try:
        everything = [direct, through, *(t for _, t in features)]
        for t in everything:  # quiet warm-up: connections, imports, caches
            await closed_loop(t, 1, 0.3, stream=False)
        profiled, profiled_gw = through, gw
        for feature, t in features:
            if feature.name == args.profile_feature:
                profiled, profiled_gw = t, servers[f"gw-{feature.name}"]
        if args.profile_only:
            res.profile = await profile(args, profiled, profiled_gw, cluster.workdir)
            return res
        pair = [direct, through]
        res.main["latency c=1"] = await interleaved(pair, rounds, 1, d / 2, False)
        for feature, t in features:
            res.features.setdefault(feature.name, {})["latency c=1"] = await interleaved(
                [through, t], rounds, 1, d / 4, False
            )
        res.main["latency c=1 after burst"] = await interleaved(
            pair, rounds, 1, d / 2, False, burst_first=True
        )
        for concurrency in (16, 64):
            res.main[f"req/s c={concurrency}"] = await interleaved(
                pair, rounds, concurrency, d, False
            )
        for feature, t in features:
            res.features[feature.name]["req/s c=64"] = await interleaved(
                [through, t], rounds, 64, d / 2, False
            )
        for t in pair:
            await closed_loop(t, 64, 0.3, stream=True)
        res.main["stream x64"] = await interleaved(pair, rounds, 64, d, True)
        if "paced-sim" in servers:
            psim, pgw = servers["paced-sim"], servers["paced-gateway"]
            paced = [target("direct", psim, psim, {}), target("gateway", pgw, psim, {})]
            res.main["stream x64 paced"] = await interleaved(paced, rounds, 64, d, True)
        res.errors = {f"{load.server.name}": load.first_error for load in loads if load.first_error}
        for feature, t in features:
            lines = sum(
                1 for line in servers[f"gw-{feature.name}"].log.open(errors="replace")
                if '"event":"request"' in line.replace(" ", "")
            )  # fmt: skip
            res.log_lines[feature.name] = (lines, t.load.sent)
        if args.profile:
            res.profile = await profile(args, profiled, profiled_gw, cluster.workdir)
    finally:
        for load in loads:
            await load.aclose()
    return res


# -- profile -----------------------------------------------------------------------------------


def _frame_key(frame: str) -> tuple[str, str]:
    """('function (module/path.py)', package) from a py-spy raw frame 'fn (path.py:line)'."""
    name, _, where = frame.partition(" (")
    path = where.rstrip(")").rsplit(":", 1)[0]
    package = path.split("/", 1)[0] if "/" in path else path.removesuffix(".py")
    return f"{name} ({path})", package


# Where the gateway's time goes, by concern: a sample counts for every concern on its stack.
CONCERNS = (
    ("upstream client (httpx/httpcore/h11 or aiohttp)", ("httpx/", "httpcore/", "aiohttp/")),
    ("  of which httpcore pool bookkeeping", ("_assign_requests_to_connections",)),
    ("  of which SSE splitting (relay)", ("SSEDecoder",)),
    ("sync dependencies run in the thread pool", ("run_in_threadpool", "WorkerThread")),
    ("FastAPI dependency solving", ("solve_dependencies",)),
    ("uvicorn response writes (ASGI send)", ("RequestResponseCycle.send",)),
    ("request logging (structlog)", ("structlog/",)),
    ("auth (gateway/auth)", ("gateway/auth/",)),
    ("rate limits (gateway/limits)", ("gateway/limits/",)),
    ("usage recording (gateway/usage)", ("gateway/usage/",)),
    ("SQLAlchemy (any caller)", ("sqlalchemy/",)),
    ("gateway: validation", ("gateway/proxy/validation.py",)),
    ("gateway: scheduler", ("gateway/proxy/scheduler.py",)),
)


def summarize_profile(raw: Path, title: str, top: int) -> list[str]:
    """Self time by package and by function (with its main caller), inclusive time."""
    own: Counter[str] = Counter()
    packages: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    concerns: Counter[str] = Counter()
    callers: dict[str, Counter[str]] = {}
    total = 0
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [_frame_key(f) for f in stack.split(";") if " (" in f and ".py" in f]
        if not frames:
            continue
        total += count
        leaf, package = frames[-1]
        own[leaf] += count
        packages[package] += count
        caller = frames[-2][0] if len(frames) > 1 else "-"
        callers.setdefault(leaf, Counter())[caller] += count
        for key in {f for f, _ in frames}:
            inclusive[key] += count
        for label, needles in CONCERNS:
            if any(n in stack for n in needles):
                concerns[label] += count
    if not total:
        return [f"{title}: py-spy collected no samples"]
    out = [f"{title}: {total} samples holding the GIL", "  by concern (inclusive):"]
    out += [f"    {concerns[label] / total:6.1%}  {label}" for label, _ in CONCERNS]
    out.append("  self time by package:")
    out += [f"    {n / total:6.1%}  {p}" for p, n in packages.most_common(12)]
    out.append("  self time by function  <- its main caller:")
    for leaf, n in own.most_common(top):
        caller = callers[leaf].most_common(1)[0][0]
        out.append(f"    {n / total:6.1%}  {leaf}  <- {caller}")
    out.append("  inclusive time (gateway, starlette, fastapi, httpx, httpcore, h11, structlog):")
    keep = ("gateway/", "starlette/", "fastapi/", "httpx", "httpcore/", "structlog/", "h11/")
    skip = ("gateway/cli.py", "gateway/__main__.py")
    shown = [
        (f, n)
        for f, n in inclusive.most_common()
        if any(k in f for k in keep) and not any(k in f for k in skip)
    ]
    out += [f"    {n / total:6.1%}  {f}" for f, n in shown[:top]]
    return out


PROFILED = (("chat c=1", 1, False), ("chat c=64", 64, False), ("stream x64", 64, True))


def py_spy() -> str | None:
    """The py-spy executable, if installed (PATH or next to this Python)."""
    found = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    return found if os.path.exists(found) else None


async def profile(args: argparse.Namespace, target: Target, gw: Server, workdir: Path) -> list[str]:
    """py-spy the gateway while it relays chat at c=1, at c=64, then 64 streams."""
    spy = py_spy()
    if spy is None:
        return ["profile: py-spy is not installed (.venv/bin/pip install py-spy)"]
    out: list[str] = []
    for name, concurrency, stream in PROFILED:
        raw = workdir / f"profile-{name.replace(' ', '-').replace('=', '')}.txt"
        spy_proc = await asyncio.create_subprocess_exec(
            spy, "record", "--pid", str(gw.proc.pid), "--duration", f"{args.profile_seconds:g}",
            "--rate", "200", "--format", "raw", "--gil", "--nonblocking", "--output", str(raw),
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        await asyncio.sleep(0.5)  # let it attach
        sample = await closed_loop(target, concurrency, args.profile_seconds, stream)
        _, err = await asyncio.wait_for(spy_proc.communicate(), timeout=30)
        if spy_proc.returncode != 0 or not raw.exists():
            out.append(f"profile {name}: py-spy failed: {err.decode(errors='replace')[-500:]}")
            continue
        rate = sample.token_rate if stream else sample.rate
        unit = "tokens/s" if stream else "req/s"
        out += summarize_profile(raw, f"profile {name} ({rate:.0f} {unit} under py-spy)", args.top)
        out.append("")
    return out


# -- report ------------------------------------------------------------------------------------


def _verdict(ok: bool) -> str:
    return "OK" if ok else "MISS"


W = 46  # label column


def _row(label: str, direct: str, gateway: str, versus: str, target: str = "") -> None:
    print(f"{label:<{W}}{direct:>10}{gateway:>10}  {versus:<16}{target}")


def report(res: Results, args: argparse.Namespace, load_avg: tuple[float, float]) -> None:
    """The tables."""
    if args.profile_only:
        print(f"gateway command: {args.gateway_cmd or 'python -m gateway serve'}")
        print("\n".join(res.profile))
        return
    m = res.main
    print(
        f"\nproxy benchmark: direct = simulator, gateway = simulator behind `python -m gateway "
        f"serve`;\nload generator {args.client} on uvloop in one process; {os.cpu_count()} CPUs; "
        f"{args.rounds} interleaved rounds x {args.duration:g}s (latency: {args.duration / 2:g}s);"
        f" load avg {load_avg[0]:.2f} -> {load_avg[1]:.2f}"
    )
    print(f"gateway command: {args.gateway_cmd or 'python -m gateway serve'}\n")
    _row("scenario", "direct", "gateway", "gateway/direct", "target")
    print("-" * (W + 20 + 2 + 16 + 14))
    for name in ("latency c=1", "latency c=1 after burst"):
        a, b = m[name]["direct"], m[name]["gateway"]
        for q, label in ((0.5, "p50"), (0.99, "p99")):
            da, db = pct(a.latencies, q), pct(b.latencies, q)
            target = ""
            if q == 0.5 and name == "latency c=1":
                target = f"<= +1 ms {_verdict(db - da <= 1.0)}"
            _row(f"{name} {label} ms", f"{da:.2f}", f"{db:.2f}", f"{db - da:+.2f} ms", target)
    for name in ("req/s c=16", "req/s c=64"):
        a, b = m[name]["direct"], m[name]["gateway"]
        _row(name, f"{a.rate:.0f}", f"{b.rate:.0f}", f"x{b.rate / max(a.rate, 1e-9):.3f}")
    for name in ("stream x64", "stream x64 paced"):
        if name not in m:
            continue
        a, b = m[name]["direct"], m[name]["gateway"]
        label = name if name == "stream x64" else f"{name} ({args.paced_tps:g} tok/s each)"
        ta, tb = pct(a.ttfts, 0.5), pct(b.ttfts, 0.5)
        _row(f"{label} TTFT p50 ms", f"{ta:.2f}", f"{tb:.2f}", f"{tb - ta:+.2f} ms")
        ratio = b.token_rate / max(a.token_rate, 1e-9)
        _row(
            f"{label} tokens/s", f"{a.token_rate:.0f}", f"{b.token_rate:.0f}", f"x{ratio:.3f}",
            f">= 0.95 {_verdict(ratio >= 0.95)}",
        )  # fmt: skip
    errors = {f"{n}/{t}": s.errors for n, d in m.items() for t, s in d.items() if s.errors}
    print(f"errors: {errors or 'none'}")
    for server, first in res.errors.items():
        print(f"  first error from {server}: {first}")

    print("\nCPU per request (us) and share of one core, by process")
    header = f"{'scenario':<26}{'side':<9}{'client':>14}{'simulator':>14}{'gateway':>14}"
    print(header + "\n" + "-" * len(header))
    for name, sides in m.items():
        for side, s in sides.items():
            cells = []
            for role in ("client", "simulator", "gateway"):
                if role not in s.cpu:
                    cells.append(f"{'-':>14}")
                    continue
                share = s.cpu[role] / max(s.elapsed, 1e-9)
                cells.append(f"{s.cpu_us(role):>8.0f} {share:>4.0%}")
            print(f"{name:<26}{side:<9}{''.join(cells)}")
    stream_gw = m["stream x64"]["gateway"]
    if stream_gw.completed:
        per_token = stream_gw.cpu["gateway"] / (stream_gw.completed * STREAM_TOKENS) * 1e6
        print(f"gateway CPU per streamed token (stream x64): {per_token:.1f} us")
    chat_gw = m["req/s c=64"]["gateway"]
    if chat_gw.completed:
        cap = 1e6 / chat_gw.cpu_us("gateway")
        print(
            f"one gateway process at 100% of a core would relay ~{cap:.0f} non-streamed req/s "
            f"({chat_gw.cpu_us('gateway'):.0f} us each)"
        )

    print(
        "\nfeatures: a gateway with the feature on vs the baseline gateway (everything off), "
        "interleaved"
    )
    header = (
        f"{'feature':<11}{'added p50 c=1':>14}{'req/s c=64':>12}{'gw CPU/req c=64':>17}"
        f"{'log lines/req':>15}  what"
    )
    print(header + "\n" + "-" * (len(header) + 30))
    for feature in FEATURES:
        if not feature.built:
            print(f"{feature.name:<11}n/a (not built yet)")
            continue
        if feature.name in res.skipped:
            print(f"{feature.name:<11}not measured: {res.skipped[feature.name]}")
            continue
        data = res.features[feature.name]
        base, on = data["latency c=1"]["gateway"], data["latency c=1"][feature.name]
        added = pct(on.latencies, 0.5) - pct(base.latencies, 0.5)
        base_r, on_r = data["req/s c=64"]["gateway"], data["req/s c=64"][feature.name]
        lines, sent = res.log_lines.get(feature.name, (0, 0))
        ratio = on_r.rate / max(base_r.rate, 1e-9)
        extra = on_r.cpu_us("gateway") - base_r.cpu_us("gateway")
        print(
            f"{feature.name:<11}{added:>+11.2f} ms{ratio:>11.3f}x{extra:>+14.0f} us"
            f"{lines / max(sent, 1):>15.2f}  {feature.note}"
        )
    added_p50 = {
        name: pct(data["latency c=1"][name].latencies, 0.5)
        - pct(data["latency c=1"]["gateway"].latencies, 0.5)
        for name, data in res.features.items()
    }
    if "auth" in added_p50 and "auth jwt" in added_p50:
        gap = added_p50["auth jwt"] - added_p50["auth"]
        print(
            f"JWT vs API key, added p50 at c=1: {added_p50['auth jwt']:+.3f} vs "
            f"{added_p50['auth']:+.3f} ms, the JWT path {gap:+.3f} ms "
            f"(target <= +0.2 ms {_verdict(gap <= 0.2)})"
        )
    print("baseline: " + " ".join(f"{k}={v}" for k, v in BASELINE_ENV.items()))
    for feature in FEATURES:
        if feature.env is not None:
            print(f"{feature.name}: " + " ".join(f"{k}={v}" for k, v in feature.env.items()))
    if res.profile:
        print()
        print("\n".join(res.profile))


def main() -> None:
    """Parse, start everything, measure, stop everything, print."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=4, help="interleaved rounds per scenario")
    parser.add_argument("--duration", type=float, default=2.0, help="seconds per run")
    parser.add_argument("--client", choices=["aiohttp", "httpx"], default="aiohttp")
    parser.add_argument("--paced-tps", type=float, default=50.0, help="0 skips the paced run")
    parser.add_argument("--quick", action="store_true", help="2 rounds of 1 s (about 45 s)")
    parser.add_argument("--profile", action="store_true", help="py-spy the gateway under load")
    parser.add_argument("--profile-only", action="store_true", help="--profile, measure nothing")
    parser.add_argument("--profile-seconds", type=float, default=5.0)
    parser.add_argument(
        "--profile-feature",
        help="profile the gateway of this feature (e.g. 'all built') instead of the baseline",
    )
    parser.add_argument("--top", type=int, default=15, help="functions shown per profile list")
    parser.add_argument(
        "--gateway-cmd",
        help="command serving the gateway instead of `python -m gateway serve` (to A/B a "
        "prototype; it reads the same environment)",
    )
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.duration = 2, 1.0
    if args.profile_only:
        args.profile, args.paced_tps = True, 0.0
    if args.client == "aiohttp":
        try:
            import aiohttp  # noqa: F401
        except ImportError:
            print("aiohttp is not installed: using httpx as the load generator", file=sys.stderr)
            args.client = "httpx"

    def on_signal(signum: int, _frame: Any) -> None:
        raise SystemExit(f"stopped by signal {signum}")

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGALRM, on_signal)
    signal.alarm((600 if not args.quick else 180) + (60 if args.profile else 0))
    workdir = Path(tempfile.mkdtemp(prefix="bench-proxy-"))
    cluster = Cluster(workdir, shlex.split(args.gateway_cmd) if args.gateway_cmd else None)
    load_before = os.getloadavg()[0]
    try:
        sim = cluster.simulator("sim", 0)
        servers = {"sim": sim, "gateway": cluster.gateway("gateway", sim, BASELINE_ENV)}
        for feature in FEATURES:
            if feature.built:
                env = {**BASELINE_ENV, **(feature.env or {})}
                servers[f"gw-{feature.name}"] = cluster.gateway(f"gw-{feature.name}", sim, env)
        if args.paced_tps > 0:
            psim = cluster.simulator("paced-sim", args.paced_tps)
            servers["paced-sim"] = psim
            servers["paced-gateway"] = cluster.gateway("paced-gateway", psim, BASELINE_ENV)
        started = time.monotonic()
        cluster.wait_ready()
        print(
            f"{len(cluster.servers)} processes ready in {time.monotonic() - started:.1f}s",
            file=sys.stderr,
        )
        feature_headers: dict[str, dict[str, str]] = {}
        skipped: dict[str, str] = {}
        for feature in FEATURES:
            if not feature.built:
                continue
            gateway = servers[f"gw-{feature.name}"]
            try:
                key = cluster.api_key(gateway) if feature.api_key else None
                if feature.jwt:
                    key = cluster.access_token(gateway)
            except (httpx.HTTPError, KeyError, ValueError) as exc:
                skipped[feature.name] = f"could not create a credential ({exc})"
                continue
            feature_headers[feature.name] = {"authorization": f"Bearer {key}"} if key else {}
        with contextlib.suppress(ImportError):
            import uvloop

            asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
        results = asyncio.run(run(args, cluster, servers, feature_headers))
        results.skipped = skipped
    finally:
        signal.alarm(0)
        cluster.stop_all()
        shutil.rmtree(workdir, ignore_errors=True)
    report(results, args, (load_before, os.getloadavg()[0]))


if __name__ == "__main__":
    main()
