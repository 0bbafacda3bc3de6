"""Fleet benchmark: one seeded trace of chat requests over three models that cannot all be
resident on two 24 GiB GPUs, replayed against three policies in one run.

The models are engine simulators standing in for deepseek-coder-7b (bf16 at 8K, one GPU), llama-3-8b
(bf16, one GPU) and qwen2-14b (bf16, tensor-parallel over both GPUs): each profile carries the
real model's `architecture` from model_profiles.yml, so the planner sizes and places it as that
model on the recorded dual-RTX-3090 reading (GPU_SNAPSHOT). The simulators take the time a real
engine takes: a 20 s cold start, a 1 s wake, a short sleep (--quick scales all of them down).

Each policy gets a fresh gateway (`python -m gateway serve`, AUTO_SWITCH=true, a temporary
SQLite database, a premium user's API key):

1. single: one engine at a time, every model change a cold start (FLEET_MAX_ENGINES=1,
   sleep_level 0: the gateway's behaviour before the fleet);
2. fleet: several engines resident, an evicted one stopped (FLEET_MAX_ENGINES=4, sleep_level 0);
3. fleet+sleep: the same, an evicted one put to sleep (sleep_level 1).

Before the trace each gateway is warmed up (one request per model, then the trace's first
model), as a gateway that has served these models before; --cold skips that. The trace is
open-loop: requests are sent at their seeded arrival times (bursts for one model, then another,
some requests interleaved), streamed, with a small max_tokens. Per policy it reports time to
first token (first content delta) p50/p95/max, failed requests (non-200, a broken stream, or
still open when no request at all has completed for 8 cold starts + 30 s: a stalled gateway),
swaps: cold starts and wakes during the trace, counted from the state changes on
/api/models/events, with evictions (stops, sleeps), the deltas of the gateway's gateway_fleet_*
series on /metrics, and the most VRAM the placement ledger claimed on each GPU at once (sampled
from gateway_fleet_vram_claim_bytes; above the GPU's memory is an overcommit). Then the ratios of
policies 2 and 3 against policy 1 (target: fleet+sleep p95 TTFT <= 0.2 x single, no failed
request); ratios are n/a when either side failed requests.

    .venv/bin/python bench/fleet.py [--quick] [--requests 90] [--seed 21] [--json PATH]
        [--swap-max-wait-s S] [--policy NAME]... [--cold] [--keep]

Loopback only; every gateway is stopped (and the engines it started) on exit, Ctrl-C or a hard
deadline, and dies with this process (PR_SET_PDEATHSIG) should it be killed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import json
import os
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from gateway.settings import Settings  # noqa: E402
from orchestrator.profiles import load_profiles  # noqa: E402

SNAPSHOT = REPO / "tests" / "fixtures" / "gpu" / "dual_rtx3090.json"
# The models the simulators stand in for (profile ids of model_profiles.yml) and their share
# of the trace's bursts.
MODELS = {"deepseek-coder-7b": 0.4, "llama-3-8b": 0.4, "qwen2-14b": 0.2}
# Served contexts other than the profile's. At its full 16K context the coder (32 KV heads, no
# grouped-query attention: 512 KiB of KV cache per token) needs 22.6 GiB, more than one 3090
# has beside the 10% reserve, so placement would spread it over both GPUs (TP=2); at 8K it
# takes one GPU, as a 7B does.
CONTEXT = {"deepseek-coder-7b": 8192}
GIB = 2**30
# The single-engine policy is the baseline: its requests must never fail only for queueing.
QUEUE_TIMEOUT_S = 3600
DEADLINE_S = {"quick": 900, "full": 3600}
_TIERS = ("FREE", "STANDARD", "PREMIUM")


@dataclass(frozen=True)
class Timing:
    """How long the simulated engines take, and how the trace is paced."""

    cold_s: float  # --startup-delay: process start to serving
    wake_s: float  # --wake-delay-s
    sleep_s: float  # --sleep-delay-s
    tokens_per_second: float
    max_tokens: int
    gap_scale: float  # multiplies the trace's inter-arrival times


FULL = Timing(
    cold_s=20.0, wake_s=1.0, sleep_s=0.5, tokens_per_second=50, max_tokens=16, gap_scale=1.0
)
QUICK = Timing(
    cold_s=2.0, wake_s=0.1, sleep_s=0.05, tokens_per_second=200, max_tokens=8, gap_scale=0.25
)


@dataclass(frozen=True)
class Policy:
    """A way to run the models: the gateway's fleet settings and the profiles' sleep level."""

    name: str
    max_engines: int
    sleep_level: int
    note: str


POLICIES = (
    Policy("single", 1, 0, "one engine at a time, cold switches"),
    Policy("fleet", 4, 0, "fleet, an evicted engine is stopped"),
    Policy("fleet+sleep", 4, 1, "fleet, an evicted engine sleeps (level 1)"),
)


# -- the trace ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Arrival:
    """One request of the trace: when it is sent (s after the start) and to which model."""

    at_s: float
    model: str


def make_trace(seed: int, count: int, gap_scale: float) -> list[Arrival]:
    """Bursts of 3-8 requests for one model (0.5 s apart on average), 2-8 s between bursts;
    one request in ten goes to another model (interleaving). Same seed, same trace."""
    rng = random.Random(seed)  # noqa: S311 (a seeded trace, not a secret)
    names, weights = list(MODELS), list(MODELS.values())
    trace: list[Arrival] = []
    at, previous = 0.0, ""
    while len(trace) < count:
        model = rng.choices(names, weights)[0]
        if model == previous:  # a burst is a change of model
            model = rng.choice([n for n in names if n != previous])
        previous = model
        for _ in range(rng.randint(3, 8)):
            if len(trace) == count:
                break
            other = rng.choice([n for n in names if n != model])
            trace.append(Arrival(round(at, 3), other if rng.random() < 0.1 else model))
            at += rng.expovariate(2.0) * gap_scale
        at += rng.uniform(2.0, 8.0) * gap_scale
    return trace


# -- profiles ----------------------------------------------------------------------------------


def profiles_file(timing: Timing, sleep_level: int, default: str) -> dict[str, Any]:
    """Simulator profiles placed as the real models (their architecture, dtype and context
    from model_profiles.yml), with the engine delays of `timing`."""
    real = load_profiles(REPO / "model_profiles.yml")
    delays = [
        *("--startup-delay", f"{timing.cold_s:g}", "--wake-delay-s", f"{timing.wake_s:g}"),
        *("--sleep-delay-s", f"{timing.sleep_s:g}"),
        *("--tokens-per-second", f"{timing.tokens_per_second:g}"),
    ]
    profiles: dict[str, Any] = {}
    for profile_id in MODELS:
        model = real.get(profile_id)
        assert model.architecture is not None, profile_id
        vllm: dict[str, Any] = {"dtype": model.vllm.dtype, "extra_args": list(delays)}
        context = CONTEXT.get(profile_id, model.vllm.max_model_len)
        if context is not None:
            vllm["max_model_len"] = context
        profiles[profile_id] = {
            "display_name": f"{model.display_name} (simulator)",
            "engine": "simulator",
            "runtime": "process",
            "served_model_name": profile_id,
            "architecture": model.architecture.model_dump(),
            "vllm": vllm,
            "sleep_level": sleep_level,
            "startup_timeout_s": max(60.0, 3 * timing.cold_s),
        }
    return {"default": default, "profiles": profiles}


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


class Gateway:
    """One gateway process with its own database, state directory and profiles."""

    def __init__(
        self,
        workdir: Path,
        policy: Policy,
        timing: Timing,
        default: str,
        overrides: dict[str, str],
    ) -> None:
        self.dir = workdir / policy.name.replace("+", "-")
        self.dir.mkdir()
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log = self.dir / "gateway.log"
        self.admin_key = "sk-admin-bench-" + secrets.token_urlsafe(24)
        profiles = self.dir / "profiles.yml"
        profiles.write_text(yaml.safe_dump(profiles_file(timing, policy.sleep_level, default)))
        env = {k: v for k, v in os.environ.items() if k not in Settings.model_fields}
        env.update(
            PYTHONPATH=str(REPO),
            ENVIRONMENT="development",
            HOST="127.0.0.1",
            PORT=str(self.port),
            ENGINE="auto",
            MODEL_PROFILES=str(profiles),
            GPU_SNAPSHOT=str(SNAPSHOT),
            AUTO_SWITCH="true",
            FLEET_MAX_ENGINES=str(policy.max_engines),
            QUEUE_TIMEOUT_S=str(QUEUE_TIMEOUT_S),
            MAX_QUEUE_SIZE="8",
            LOG_LEVEL="INFO",
            LOG_FORMAT="json",
            DATABASE_URL=f"sqlite:///{self.dir / 'gateway.db'}",
            STATE_DIR=str(self.dir / "state"),
            ADMIN_API_KEY=self.admin_key,
            REQUIRE_AUTH="true",
            RATE_LIMIT_REQUESTS="0",
            **{f"RATE_LIMIT_{t}_{w}": "0" for t in _TIERS for w in ("PER_MINUTE", "PER_HOUR")},
            **{f"RATE_LIMIT_{t}_TOKENS_PER_MINUTE": "0" for t in _TIERS},
        )
        env.update(overrides)
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "gateway", "serve"], cwd=self.dir, env=env,
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True, preexec_fn=_die_with_parent,
            )  # fmt: skip

    @property
    def admin(self) -> dict[str, str]:
        """The admin key's header."""
        return {"authorization": f"Bearer {self.admin_key}"}

    async def wait(self, session: aiohttp.ClientSession, path: str, timeout_s: float) -> None:
        """Poll `path` until 200; the gateway's log tail if it exits or never gets there."""
        deadline = time.monotonic() + timeout_s
        while True:
            if self.proc.poll() is not None:
                raise SystemExit(f"gateway exited ({self.proc.returncode}):\n{self.tail()}")
            with contextlib.suppress(aiohttp.ClientError):
                async with session.get(self.base + path) as response:
                    if response.status == 200:
                        return
            if time.monotonic() > deadline:
                raise SystemExit(f"{path} was not 200 within {timeout_s:g}s:\n{self.tail()}")
            await asyncio.sleep(0.1)

    async def api_key(self, session: aiohttp.ClientSession) -> str:
        """A premium user's API key, created with the admin key."""
        body = {"user_id": "bench", "tier": "premium", "description": "bench/fleet.py"}
        async with session.post(
            self.base + "/admin/api/keys", json=body, headers=self.admin
        ) as response:
            data = await response.json()
            if response.status != 201:
                raise SystemExit(f"creating an API key: HTTP {response.status}: {data}")
            key: str = data["key"]
            return key

    def tail(self, lines: int = 30) -> str:
        """The last lines of the gateway's log."""
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def stop(self) -> None:
        """SIGTERM (the gateway stops its engines), SIGKILL after 60 s; then any engine the
        gateway left running (its runtime's state files name them) is killed too."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        for state in (self.dir / "state" / "engines").glob("*.json"):
            with contextlib.suppress(OSError, ValueError, KeyError, ProcessLookupError):
                pid = int(json.loads(state.read_text())["pid"])
                if "simulator" in Path(f"/proc/{pid}/cmdline").read_text():
                    os.killpg(pid, signal.SIGKILL)


# -- measuring ---------------------------------------------------------------------------------


@dataclass
class Outcome:
    """One request of the trace as the client saw it."""

    at_s: float
    model: str
    status: int = 0
    ttft_s: float | None = None  # first content delta, from the send
    total_s: float = 0.0
    error: str = ""

    @property
    def failed(self) -> bool:
        """Non-200, or a stream that broke or carried no content."""
        return bool(self.error)


async def chat(
    session: aiohttp.ClientSession, url: str, key: str, model: str, max_tokens: int
) -> Outcome:
    """One streamed chat completion; its time to first token and whether it ended cleanly."""
    body = {
        "model": model,
        "messages": [{"role": "user", "content": f"A short answer about {model}, please."}],
        "max_tokens": max_tokens,
        "stream": True,
    }
    outcome = Outcome(at_s=0.0, model=model)
    started = time.perf_counter()
    try:
        async with session.post(
            url, json=body, headers={"authorization": f"Bearer {key}"}
        ) as response:
            outcome.status = response.status
            if response.status != 200:
                text = (await response.read()).decode(errors="replace")
                outcome.error = f"HTTP {response.status}: {text[:300]}"
                return outcome
            done = False
            async for raw in response.content:
                line = raw.strip()
                if not line.startswith(b"data:"):
                    continue
                payload = line[5:].strip()
                if payload == b"[DONE]":
                    done = True
                    break
                event = json.loads(payload)
                if "error" in event:
                    outcome.error = f"stream error: {json.dumps(event['error'])[:300]}"
                    return outcome
                choices = event.get("choices") or [{}]
                content = (choices[0].get("delta") or {}).get("content")
                if content and outcome.ttft_s is None:
                    outcome.ttft_s = time.perf_counter() - started
            if not done:
                outcome.error = "the stream ended without [DONE]"
            elif outcome.ttft_s is None:
                outcome.error = "the stream carried no content"
    except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
        outcome.error = f"{type(exc).__name__}: {exc}"
    finally:
        outcome.total_s = time.perf_counter() - started
    return outcome


class EngineWatch:
    """Follows /api/models/events from the gateway's start: the state of every engine, how
    often each entered each state, and the events that report a failure."""

    def __init__(self) -> None:
        self.state: dict[str, str] = {}
        self.entered: Counter[tuple[str, str]] = Counter()
        self.failures: list[dict[str, Any]] = []
        self.events: list[dict[str, Any]] = []
        self.following = asyncio.Event()

    async def follow(self, session: aiohttp.ClientSession, gateway: Gateway) -> None:
        """Read the event stream until cancelled."""
        async with session.get(
            gateway.base + "/api/models/events",
            headers=gateway.admin,
            timeout=aiohttp.ClientTimeout(total=None, sock_read=None),
        ) as response:
            if response.status != 200:
                raise SystemExit(f"/api/models/events: HTTP {response.status}")
            kind = ""
            async for raw in response.content:
                line = raw.decode(errors="replace").rstrip("\r\n")
                if line.startswith("event:"):
                    kind = line[6:].strip()
                elif line.startswith("data:"):
                    self._on(kind, json.loads(line[5:]))

    def _on(self, kind: str, data: dict[str, Any]) -> None:
        self.following.set()
        profile, state = data.get("profile_id"), data.get("state")
        if not profile or not state:
            return
        if kind == "progress":
            self.events.append(data)
            if state == "failed" or "fail" in (data.get("message") or "").lower():
                self.failures.append(data)
        if self.state.get(profile, "idle") != state:
            self.entered[(profile, state)] += 1
        self.state[profile] = state

    def count(self, state: str) -> int:
        """How many times any engine entered `state`."""
        return sum(n for (_, s), n in self.entered.items() if s == state)


async def watch_claims(
    session: aiohttp.ClientSession, gateway: Gateway, peak: dict[str, float]
) -> None:
    """Every 0.25 s until cancelled: the most the placement ledger claimed on each GPU at
    once (the sum of gateway_fleet_vram_claim_bytes over its engines), into `peak`."""
    while True:
        per_gpu: Counter[str] = Counter()
        for name, value in (await fleet_series(session, gateway)).items():
            if name.startswith("gateway_fleet_vram_claim_bytes{"):
                gpu = name.split('gpu="', 1)[1].split('"', 1)[0]
                per_gpu[gpu] += int(value)
        for gpu, held in per_gpu.items():
            peak[gpu] = max(peak.get(gpu, 0.0), held)
        await asyncio.sleep(0.25)


def gpu_totals() -> dict[str, float]:
    """GiB of memory of each GPU of the recorded reading."""
    gpus = json.loads(SNAPSHOT.read_text())["gpus"]
    return {str(g["index"]): round(g["memory_total_bytes"] / GIB, 2) for g in gpus}


async def fleet_series(session: aiohttp.ClientSession, gateway: Gateway) -> dict[str, float]:
    """The gateway_fleet_* samples on /metrics (empty when there are none)."""
    async with session.get(gateway.base + "/metrics") as response:
        text = await response.text()
    samples: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("gateway_fleet_"):
            name, _, value = line.rpartition(" ")
            with contextlib.suppress(ValueError):
                samples[name] = float(value)
    return samples


@dataclass
class PolicyResult:
    """What one policy did with the trace."""

    policy: str
    note: str
    requests: int
    failed: int
    ttft_p50_s: float | None
    ttft_p95_s: float | None
    ttft_max_s: float | None
    trace_s: float  # first send to last reply
    warmup_s: float
    cold_starts: int  # engines started during the trace
    wakes: int
    swaps: int  # cold starts + wakes
    stops: int
    sleeps: int
    failed_jobs: list[dict[str, Any]]
    errors: list[str]
    fleet_metrics: dict[str, float]  # deltas of gateway_fleet_* *_count / *_total over the trace
    peak_claim_gib: dict[str, float]  # GPU -> the most the ledger claimed on it at once
    gpu_total_gib: dict[str, float]
    events: list[dict[str, Any]] = field(default_factory=list)  # engine events of the trace
    outcomes: list[dict[str, Any]] = field(default_factory=list)


def quantile(values: list[float], q: float) -> float | None:
    """Nearest-rank quantile; None when empty."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered)) - 1))]


async def run_policy(
    policy: Policy,
    trace: list[Arrival],
    timing: Timing,
    workdir: Path,
    *,
    warm: bool,
    overrides: dict[str, str],
) -> PolicyResult:
    """A fresh gateway for `policy`, warmed up, then the trace, then its figures."""
    first = trace[0].model
    gateway = Gateway(workdir, policy, timing, first, overrides)
    watch = EngineWatch()
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=QUEUE_TIMEOUT_S + 600)
    url = gateway.base + "/v1/chat/completions"
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        follower: asyncio.Task[None] | None = None
        try:
            await gateway.wait(session, "/health", 120)
            follower = asyncio.create_task(watch.follow(session, gateway))
            await asyncio.wait_for(watch.following.wait(), 30)
            key = await gateway.api_key(session)
            await gateway.wait(session, "/health/ready", 60 + 3 * timing.cold_s)
            warm_start = time.monotonic()
            if warm:
                # Every model once, the trace's first last: a gateway that served them before.
                for model in [*(m for m in MODELS if m != first), first]:
                    outcome = await chat(session, url, key, model, timing.max_tokens)
                    if outcome.failed:
                        raise SystemExit(f"{policy.name}: warm-up {model}: {outcome.error}")
            warmup_s = time.monotonic() - warm_start
            await asyncio.sleep(max(1.0, 2 * timing.sleep_s))  # let the last switch settle
            before_entered, first_event = Counter(watch.entered), len(watch.events)
            before_metrics = await fleet_series(session, gateway)
            peak: dict[str, float] = {}
            claims = asyncio.create_task(watch_claims(session, gateway, peak))
            try:
                stall_s = 8 * timing.cold_s + 30
                outcomes = await replay(session, url, key, trace, timing.max_tokens, stall_s)
            finally:
                claims.cancel()
                await asyncio.gather(claims, return_exceptions=True)
            trace_s = max(o.at_s + o.total_s for o in outcomes)
            after_metrics = await fleet_series(session, gateway)
        finally:
            if follower is not None:
                follower.cancel()
                await asyncio.gather(follower, return_exceptions=True)
            await asyncio.to_thread(gateway.stop)
    during = watch.entered - before_entered
    cold = sum(n for (_, s), n in during.items() if s == "starting")
    wakes = sum(n for (_, s), n in during.items() if s == "waking")
    ttfts = [o.ttft_s for o in outcomes if o.ttft_s is not None and not o.failed]
    deltas = {
        name: after_metrics[name] - before_metrics.get(name, 0.0)
        for name in after_metrics
        if "_count" in name or "_total" in name
    }
    errors = [f"{o.model} at {o.at_s:.1f}s: {o.error}" for o in outcomes if o.failed]
    return PolicyResult(
        policy=policy.name,
        note=policy.note,
        requests=len(outcomes),
        failed=len(errors),
        ttft_p50_s=quantile(ttfts, 0.50),
        ttft_p95_s=quantile(ttfts, 0.95),
        ttft_max_s=max(ttfts) if ttfts else None,
        trace_s=trace_s,
        warmup_s=warmup_s,
        cold_starts=cold,
        wakes=wakes,
        swaps=cold + wakes,
        stops=sum(n for (_, s), n in during.items() if s == "stopping"),
        sleeps=sum(n for (_, s), n in during.items() if s == "sleeping"),
        failed_jobs=watch.failures,
        errors=errors,
        fleet_metrics={k: v for k, v in deltas.items() if v},
        peak_claim_gib={gpu: round(held / GIB, 2) for gpu, held in sorted(peak.items())},
        gpu_total_gib=gpu_totals(),
        events=watch.events[first_event:],
        outcomes=[asdict(o) for o in outcomes],
    )


async def replay(
    session: aiohttp.ClientSession,
    url: str,
    key: str,
    trace: list[Arrival],
    max_tokens: int,
    stall_s: float,
) -> list[Outcome]:
    """Send every request at its arrival time (open loop) and wait for all of them, unless
    no reply at all completes for `stall_s` (the gateway stalls, e.g. swapping engines without
    serving): then the requests still open fail as stalled, and the replay ends."""
    start = time.perf_counter()
    outcomes = [Outcome(at_s=a.at_s, model=a.model) for a in trace]
    last_reply = start

    async def send(index: int, arrival: Arrival) -> None:
        nonlocal last_reply
        await asyncio.sleep(max(0.0, start + arrival.at_s - time.perf_counter()))
        sent_at = time.perf_counter() - start
        outcome = await chat(session, url, key, arrival.model, max_tokens)
        outcome.at_s = sent_at
        outcomes[index] = outcome
        last_reply = time.perf_counter()

    tasks = [asyncio.create_task(send(i, a)) for i, a in enumerate(trace)]
    pending: set[asyncio.Task[None]] = set(tasks)
    while pending:
        _, pending = await asyncio.wait(pending, timeout=1.0)
        now = time.perf_counter()
        if pending and now - last_reply > stall_s:
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
            for outcome, task in zip(outcomes, tasks, strict=True):
                if task in pending:
                    outcome.total_s = max(0.0, now - start - outcome.at_s)
                    outcome.error = f"stalled: no request completed for {stall_s:g}s"
            break
    return outcomes


# -- report ------------------------------------------------------------------------------------


def _s(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def _ratio(value: float | None, base: float | None) -> str:
    return "n/a" if value is None or not base else f"x{value / base:.3g}"


def overcommitted(result: PolicyResult) -> list[str]:
    """GPUs on which the ledger claimed more than the GPU has at some point."""
    return [
        gpu
        for gpu, held in result.peak_claim_gib.items()
        if held > result.gpu_total_gib.get(gpu, float("inf"))
    ]


def _claims(result: PolicyResult) -> str:
    if not result.peak_claim_gib:
        return "n/a"
    return " ".join(f"{gpu}:{held:.1f}" for gpu, held in result.peak_claim_gib.items())


def report(results: list[PolicyResult], trace: list[Arrival], timing: Timing) -> None:
    """The table, the ratios against the first policy, and what went wrong."""
    per_model = Counter(a.model for a in trace)
    print(
        f"trace: {len(trace)} requests over {trace[-1].at_s:.0f}s "
        f"({', '.join(f'{m} {n}' for m, n in per_model.items())}); engines: cold start "
        f"{timing.cold_s:g}s, wake {timing.wake_s:g}s, sleep {timing.sleep_s:g}s, "
        f"{timing.tokens_per_second:g} tokens/s, max_tokens {timing.max_tokens}"
    )
    header = (
        f"{'policy':<12} {'reqs':>4} {'failed':>6} {'TTFT p50':>9} {'p95':>7} {'max':>7} "
        f"{'swaps':>5} {'cold':>4} {'wake':>4} {'stop':>4} {'sleep':>5} {'trace s':>8}  "
        "peak claim GiB per GPU"
    )
    print(header)
    print("-" * len(header))
    for r in results:
        print(
            f"{r.policy:<12} {r.requests:>4} {r.failed:>6} {_s(r.ttft_p50_s):>9} "
            f"{_s(r.ttft_p95_s):>7} {_s(r.ttft_max_s):>7} {r.swaps:>5} {r.cold_starts:>4} "
            f"{r.wakes:>4} {r.stops:>4} {r.sleeps:>5} {r.trace_s:>8.1f}  {_claims(r)}"
        )
    base = results[0]
    for r in results[1:]:
        if base.failed or r.failed:
            # Percentiles over the requests that succeeded compare nothing.
            print(f"{r.policy} / {base.policy}: n/a (failed: {base.failed} and {r.failed})")
            continue
        print(
            f"{r.policy} / {base.policy}: TTFT p50 {_ratio(r.ttft_p50_s, base.ttft_p50_s)}, "
            f"p95 {_ratio(r.ttft_p95_s, base.ttft_p95_s)}, swaps {r.swaps} vs {base.swaps}"
        )
    named = {r.policy: r for r in results}
    single, slept = named.get("single"), named.get("fleet+sleep")
    if single is not None and single.failed:
        print(f"target: not measurable, the single-engine baseline failed {single.failed}")
    elif single is not None and slept is not None:
        met = (
            slept.ttft_p95_s is not None
            and single.ttft_p95_s is not None
            and slept.ttft_p95_s <= 0.2 * single.ttft_p95_s
            and slept.failed == 0
        )
        over = overcommitted(slept)
        caveat = f" (but the ledger overcommitted GPU {', '.join(over)})" if over else ""
        print(
            f"target (fleet+sleep p95 <= 0.2 x single, 0 failed): "
            f"{'met' if met else 'NOT met'}{caveat}"
        )
    for r in results:
        for gpu in overcommitted(r):
            print(
                f"{r.policy}: GPU {gpu}: the ledger claimed {r.peak_claim_gib[gpu]} GiB at once, "
                f"more than its {r.gpu_total_gib[gpu]} GiB"
            )
        if r.fleet_metrics:
            print(f"{r.policy}: gateway_fleet_* over the trace: {r.fleet_metrics}")
        for error in r.errors[:5]:
            print(f"{r.policy}: failed request: {error}")
        for job in r.failed_jobs[:5]:
            print(
                f"{r.policy}: engine event: {job.get('profile_id')} {job.get('state')}: "
                f"{job.get('message')}"
            )


# -- main --------------------------------------------------------------------------------------


async def run(
    args: argparse.Namespace, trace: list[Arrival], timing: Timing, workdir: Path
) -> list[PolicyResult]:
    """Every chosen policy, one after another, each on the same trace."""
    results = []
    for policy in POLICIES:
        if args.policy and policy.name not in args.policy:
            continue
        print(f"{policy.name}: {policy.note} ...", file=sys.stderr, flush=True)
        overrides = {}
        if args.swap_max_wait_s is not None:
            overrides["SWAP_MAX_WAIT_S"] = f"{args.swap_max_wait_s:g}"
        result = await run_policy(
            policy, trace, timing, workdir, warm=not args.cold, overrides=overrides
        )
        print(
            f"{policy.name}: done in {result.trace_s:.0f}s, {result.failed} failed",
            file=sys.stderr,
            flush=True,
        )
        results.append(result)
    return results


def main() -> None:
    """Parse, run every policy with its own gateway, print; exit 1 when a request failed."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="engine delays / 10, 24 requests")
    parser.add_argument("--requests", type=int, help="trace length (default 90; --quick 24)")
    parser.add_argument("--seed", type=int, default=21)
    parser.add_argument("--cold", action="store_true", help="no warm-up: every engine starts cold")
    parser.add_argument(
        "--policy", action="append", choices=[p.name for p in POLICIES], help="only these"
    )
    parser.add_argument("--json", help="write the figures (and every request) to this file")
    parser.add_argument("--keep", action="store_true", help="keep the gateways' logs")
    parser.add_argument(
        "--swap-max-wait-s",
        type=float,
        help="SWAP_MAX_WAIT_S for every gateway (default: the gateway's own default)",
    )
    args = parser.parse_args()
    timing = QUICK if args.quick else FULL
    args.requests = args.requests or (24 if args.quick else 90)

    def on_signal(signum: int, _frame: Any) -> None:
        raise SystemExit(f"stopped by signal {signum}")

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGALRM, on_signal)
    signal.alarm(DEADLINE_S["quick" if args.quick else "full"])
    trace = make_trace(args.seed, args.requests, timing.gap_scale)
    workdir = Path(tempfile.mkdtemp(prefix="bench-fleet-"))
    results: list[PolicyResult] = []
    try:
        results = asyncio.run(run(args, trace, timing, workdir))
    finally:
        signal.alarm(0)
        if args.keep or not results or any(r.failed for r in results):
            # The gateways' and engines' logs, to see what went wrong.
            print(f"logs kept in {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    report(results, trace, timing)
    if args.json:
        document = {
            "timing": asdict(timing),
            "seed": args.seed,
            "warm": not args.cold,
            "swap_max_wait_s": args.swap_max_wait_s,
            "trace": [asdict(a) for a in trace],
            "policies": [asdict(r) for r in results],
        }
        Path(args.json).write_text(json.dumps(document, indent=2) + "\n")
    if any(r.failed for r in results):
        raise SystemExit(1)


if __name__ == "__main__":
    main()
