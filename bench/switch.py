"""Switch benchmark: a switch through VLLMModelManager vs the same engines started bare.

Both sides do the same work in the same run, alternating: stop the running engine, start the
other one, wait until it answers /health with 200. "bare" is a plain subprocess plus a tight
health poll; "manager" is an exclusive `request_switch` through the real manager and
ProcessRuntime (drain, state machine, /v1/models check, events). Exclusive, because a plain
switch keeps the previous engine running beside the new one (the fleet): switching back to it
would then only change the default, not stop and start anything. The ratio manager/bare is
what is reported (target <= 1.1). Loopback only; bounded by --rounds.

    .venv/bin/python bench/switch.py [--rounds 6] [--engine simulator|tiny-cpu]
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import socket
import statistics
import sys
import time
from pathlib import Path

import httpx
import structlog

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from orchestrator.manager import JobStatus, VLLMModelManager  # noqa: E402
from orchestrator.runtimes import EngineSpec, ProcessRuntime  # noqa: E402


def free_port() -> int:
    """A free loopback port."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def command(engine: str, name: str, port: int) -> tuple[str, ...]:
    """The argv of one engine."""
    if engine == "simulator":
        return (
            sys.executable, "-m", "simulator",
            "--host", "127.0.0.1", "--port", str(port), "--model", name,
        )  # fmt: skip
    cache = Path(os.environ.get("VCG_CACHE", Path.home() / ".cache" / "vllm-chat-gateway"))
    return (
        str(cache / "vllm-venv" / "bin" / "python"),
        "-m", "vllm.entrypoints.openai.api_server",
        "--model", str(cache / "tiny-llama"), "--served-model-name", name,
        "--host", "127.0.0.1", "--port", str(port),
        "--max-model-len", "256", "--dtype", "float32", "--enforce-eager",
    )  # fmt: skip


ENGINE_ENV = {"HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_NO_USAGE_STATS": "1"}


async def wait_healthy(client: httpx.AsyncClient, port: int, timeout_s: float) -> None:
    """Tight poll of /health until 200."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if (await client.get(f"http://127.0.0.1:{port}/health")).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        await asyncio.sleep(0.01)
    raise TimeoutError("engine did not become healthy")


async def bare_switch(
    client: httpx.AsyncClient, engine: str, running: asyncio.subprocess.Process | None, name: str
) -> tuple[float, asyncio.subprocess.Process]:
    """Stop the running engine, start another, wait for health; seconds taken."""
    started = time.perf_counter()
    if running is not None:
        os.killpg(running.pid, signal.SIGTERM)
        await running.wait()
    port = free_port()
    process = await asyncio.create_subprocess_exec(
        *command(engine, name, port),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
        env={**os.environ, **ENGINE_ENV},
        start_new_session=True,
    )
    await wait_healthy(client, port, 600)
    return time.perf_counter() - started, process


async def main() -> None:
    """Run the rounds and print the table."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--engine", choices=["simulator", "tiny-cpu"], default="simulator")
    args = parser.parse_args()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))

    def spec_for(profile_id: str) -> EngineSpec:
        port = free_port()
        return EngineSpec(
            profile_id=profile_id,
            served_model_name=profile_id,
            runtime="process",
            command=command(args.engine, profile_id, port),
            env=ENGINE_ENV,
            port=port,
            startup_timeout_s=600,
        )

    bare: list[float] = []
    managed: list[float] = []
    async with httpx.AsyncClient(timeout=5) as client:
        manager = VLLMModelManager(
            http=client, runtimes={"process": ProcessRuntime()}, spec_factory=spec_for
        )
        process: asyncio.subprocess.Process | None = None
        try:
            await manager.wait_job(manager.request_switch("engine-a", exclusive=True).id)
            _, process = await bare_switch(client, args.engine, None, "engine-a")
            for round_no in range(args.rounds):
                target = "engine-b" if round_no % 2 == 0 else "engine-a"
                seconds, process = await bare_switch(client, args.engine, process, target)
                bare.append(seconds)
                started = time.perf_counter()
                job = await manager.wait_job(manager.request_switch(target, exclusive=True).id)
                managed.append(time.perf_counter() - started)
                if job.status is not JobStatus.SUCCEEDED:
                    raise SystemExit(f"switch failed: {job.error}")
        finally:
            if process is not None:
                os.killpg(process.pid, signal.SIGTERM)
                await process.wait()
            await manager.aclose()
    b, m = statistics.median(bare), statistics.median(managed)
    print(f"engine: {args.engine}, rounds: {args.rounds} (median seconds, stop + start to ready)")
    print(f"  bare     {b:8.3f}  (min {min(bare):.3f}, max {max(bare):.3f})")
    print(f"  manager  {m:8.3f}  (min {min(managed):.3f}, max {max(managed):.3f})")
    print(f"  ratio manager/bare = {m / b:.3f}  (target <= 1.1)")


if __name__ == "__main__":
    asyncio.run(main())
