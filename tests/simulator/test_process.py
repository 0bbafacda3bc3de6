"""Tests of the simulator as a real process: ``python -m simulator``."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import orjson
import pytest
from openai.types.chat import ChatCompletionMessageParam

from tests.helpers.paths import REPO

CHAT = "/v1/chat/completions"
HELLO = [{"role": "user", "content": "Tell me something about simulated engines"}]
SDK_HELLO: list[ChatCompletionMessageParam] = [
    {"role": "user", "content": "Tell me something about simulated engines"}
]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class SimProcess:
    """A simulator subprocess, its port and its log file."""

    def __init__(self, log_dir: Path, *args: str) -> None:
        """Start ``python -m simulator`` on a free port with ``args``."""
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_dir / f"simulator-{self.port}.log"
        self._log = self.log_path.open("wb")
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
        self.started_at = time.monotonic()
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "simulator",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                *args,
            ],
            cwd=REPO,
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    def log(self) -> str:
        """Everything the process has printed so far."""
        return self.log_path.read_text(errors="replace")

    def wait_healthy(self, timeout: float = 15.0) -> float:
        """Poll ``/health`` until it answers 200; returns the seconds since start."""
        deadline = time.monotonic() + timeout
        with httpx.Client(timeout=1.0) as client:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise AssertionError(f"simulator exited early:\n{self.log()}")
                try:
                    if client.get(self.base_url + "/health").status_code == 200:
                        return time.monotonic() - self.started_at
                except httpx.TransportError:
                    time.sleep(0.05)
        raise AssertionError(f"simulator not healthy within {timeout}s:\n{self.log()}")

    def stop(self) -> None:
        """Terminate the process (if it still runs) and close the log."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        self._log.close()


@pytest.fixture(scope="module")
def sim(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimProcess]:
    """One simulator process shared by the tests of this module, with its test routes (the
    tests read its counters and inject faults through headers)."""
    process = SimProcess(
        tmp_path_factory.mktemp("sim"),
        *("--model", "sim-model", "--served-model-name", "sim", "--test-routes"),
    )
    try:
        process.wait_healthy()
        yield process
    finally:
        process.stop()


@pytest.fixture
async def http(sim: SimProcess) -> AsyncIterator[httpx.AsyncClient]:
    """An httpx client for the shared simulator process."""
    async with httpx.AsyncClient(base_url=sim.base_url, timeout=5.0) as client:
        yield client


async def stats(client: httpx.AsyncClient) -> dict[str, Any]:
    """The simulator's ``/simulator/stats``."""
    body: dict[str, Any] = (await client.get("/simulator/stats")).json()
    return body


async def wait_for_stats(
    client: httpx.AsyncClient, key: str, value: int, within: float = 3.0
) -> dict[str, Any]:
    """Poll ``/simulator/stats`` until ``key`` reaches ``value`` and nothing runs."""
    deadline = time.monotonic() + within
    current = await stats(client)
    while time.monotonic() < deadline:
        if current[key] >= value and current["running"] == 0:
            return current
        await asyncio.sleep(0.02)
        current = await stats(client)
    raise AssertionError(f"stats never reached {key}={value}: {current}")


async def collect_tokens(
    client: httpx.AsyncClient,
    path: str,
    body: dict[str, Any],
    seen: list[str],
    headers: dict[str, str] | None = None,
    read_timeout: float = 5.0,
) -> None:
    """Stream ``path`` and append every content token to ``seen`` until the stream ends."""
    timeout = httpx.Timeout(5.0, read=read_timeout)
    async with client.stream("POST", path, json=body, headers=headers, timeout=timeout) as resp:
        assert resp.status_code == 200
        async for line in resp.aiter_lines():
            token = content_of(line)
            if token is not None:
                seen.append(token)


def content_of(line: str) -> str | None:
    """The token text of an SSE chat/completion line, ``None`` for other lines."""
    if not line.startswith("data: {"):
        return None
    choices = orjson.loads(line[len("data: ") :]).get("choices") or []
    if not choices or choices[0].get("finish_reason") is not None:
        return None
    if "text" in choices[0]:
        return str(choices[0]["text"])
    content = choices[0]["delta"].get("content")
    return str(content) if content else None


async def test_openai_sdk_against_the_process(sim: SimProcess) -> None:
    async with openai.AsyncOpenAI(base_url=sim.base_url + "/v1", api_key="unused") as client:
        models = await client.models.list()
        assert [m.id for m in models.data] == ["sim"]
        assert models.data[0].owned_by == "vllm-chat-gateway-simulator"

        chat = await client.chat.completions.create(model="sim", messages=SDK_HELLO, max_tokens=6)
        assert chat.choices[0].finish_reason == "length"
        assert chat.usage is not None
        assert chat.usage.completion_tokens == 6
        assert len((chat.choices[0].message.content or "").split()) == 6

        stream = await client.chat.completions.create(
            model="sim",
            messages=SDK_HELLO,
            max_tokens=4,
            stream=True,
            stream_options={"include_usage": True},
        )
        pieces: list[str] = []
        finish: list[str] = []
        usage_seen = []
        async for chunk in stream:
            if chunk.usage is not None:
                usage_seen.append(chunk.usage.completion_tokens)
            for choice in chunk.choices:
                if choice.delta.content:
                    pieces.append(choice.delta.content)
                if choice.finish_reason:
                    finish.append(choice.finish_reason)
        assert len(pieces) == 4
        assert finish == ["length"]
        assert usage_seen == [4]
        # Same prompt, same seed: the stream is a prefix of the longer non-streamed reply.
        assert "".join(pieces) == " ".join((chat.choices[0].message.content or "").split()[:4])

        completion = await client.completions.create(model="sim", prompt="Once", max_tokens=3)
        assert completion.usage is not None
        assert completion.usage.completion_tokens == 3
        assert completion.choices[0].finish_reason == "length"

        embedding = await client.embeddings.create(model="sim", input=["a", "b"])
        assert [len(d.embedding) for d in embedding.data] == [64, 64]
        norm = sum(v * v for v in embedding.data[0].embedding)
        assert abs(norm - 1.0) < 1e-5


async def test_die_header_drops_only_that_connection(
    sim: SimProcess, http: httpx.AsyncClient
) -> None:
    seen: list[str] = []
    before = (await stats(http))["failed_total"]
    with pytest.raises(httpx.RemoteProtocolError):
        await collect_tokens(
            http,
            CHAT,
            {"messages": HELLO, "max_tokens": 20, "stream": True},
            seen,
            headers={"X-Simulator-Die-After-Chunks": "3"},
        )
    assert len(seen) == 3
    assert sim.proc.poll() is None
    assert (await http.get("/health")).status_code == 200
    after = await wait_for_stats(http, "failed_total", before + 1)
    assert after["failed_total"] == before + 1
    assert "Exception in ASGI application" not in sim.log()


async def test_stall_header_makes_the_client_time_out(
    sim: SimProcess, http: httpx.AsyncClient
) -> None:
    before = (await stats(http))["aborted_total"]
    seen: list[str] = []
    with pytest.raises(httpx.ReadTimeout):
        await collect_tokens(
            http,
            "/v1/completions",
            {"prompt": "stall please", "max_tokens": 20, "stream": True},
            seen,
            headers={"X-Simulator-Stall-After-Chunks": "2"},
            read_timeout=0.4,
        )
    assert len(seen) == 2
    after = await wait_for_stats(http, "aborted_total", before + 1)
    assert after["aborted_total"] == before + 1


async def test_stall_header_on_a_non_streamed_request(http: httpx.AsyncClient) -> None:
    before = (await stats(http))["aborted_total"]
    with pytest.raises(httpx.ReadTimeout):
        await http.post(
            "/v1/completions",
            json={"prompt": "stall", "max_tokens": 5},
            headers={"X-Simulator-Stall-After-Chunks": "1"},
            timeout=httpx.Timeout(5.0, read=0.3),
        )
    after = await wait_for_stats(http, "aborted_total", before + 1)
    assert after["aborted_total"] == before + 1


async def test_client_disconnect_is_counted_as_aborted(http: httpx.AsyncClient) -> None:
    before = await stats(http)
    async with http.stream(
        "POST",
        CHAT,
        json={"messages": HELLO, "max_tokens": 500, "ignore_eos": True, "stream": True},
        headers={"X-Simulator-Tokens-Per-Second": "50"},
    ) as response:
        received = 0
        # Held: a dropped line iterator is finalized soon after the break, and its close
        # closes the connection, so the request would be aborted before it is looked at.
        lines = response.aiter_lines()
        async for line in lines:
            if content_of(line) is not None:
                received += 1
            if received == 2:
                break
        during = await stats(http)
        assert during["running"] == before["running"] + 1
        metrics = (await http.get("/metrics")).text
        assert 'vllm:num_requests_running{model_name="sim"} 1.0' in metrics
        assert 'vllm:kv_cache_usage_perc{model_name="sim"} 0.0\n' not in metrics
    after = await wait_for_stats(http, "aborted_total", before["aborted_total"] + 1)
    assert after["aborted_total"] == before["aborted_total"] + 1
    assert after["completed_total"] == before["completed_total"]
    # Stopped promptly: far fewer than the 500 tokens were generated.
    assert after["generation_tokens_total"] - before["generation_tokens_total"] < 20


async def test_process_level_die_after_chunks_kills_the_process(
    tmp_path: Path,
) -> None:
    process = SimProcess(tmp_path, "--die-after-chunks", "2")
    try:
        process.wait_healthy()
        seen: list[str] = []
        async with httpx.AsyncClient(base_url=process.base_url, timeout=5.0) as client:
            with pytest.raises(httpx.RemoteProtocolError):
                await collect_tokens(
                    client, CHAT, {"messages": HELLO, "max_tokens": 10, "stream": True}, seen
                )
        assert len(seen) == 2
        assert process.proc.wait(timeout=5) == 1
        assert "SIMULATOR" in process.log()
    finally:
        process.stop()


async def test_without_test_routes_the_process_serves_no_test_route_and_no_fault(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    canary = "canary-prompt-2b8d41 nobody may read this back"
    # Even with SIMULATOR_TEST_ROUTES in its environment: only the flag turns them on.
    monkeypatch.setenv("SIMULATOR_TEST_ROUTES", "1")
    process = SimProcess(tmp_path, "--model", "sim")
    try:
        process.wait_healthy()
        answers: list[bytes] = []
        async with httpx.AsyncClient(base_url=process.base_url, timeout=5.0) as client:
            body = {"messages": [{"role": "user", "content": canary}], "max_tokens": 3}
            for stream in (False, True):
                response = await client.post(
                    CHAT,
                    json={**body, "stream": stream},
                    headers={"X-Simulator-Status": "503", "X-Simulator-Die-After-Chunks": "1"},
                )
                assert response.status_code == 200, response.text
                answers.append(response.content)
            for method, path in (
                ("GET", "/simulator/requests"),
                ("GET", "/simulator/stats"),
                ("POST", "/simulator/reset"),
            ):
                response = await client.request(method, path)
                assert response.status_code == 404, (path, response.text)
                answers.append(response.content)
            answers.append((await client.get("/metrics")).content)
        assert not [answer for answer in answers if canary.encode() in answer]
        assert process.proc.poll() is None
        assert canary not in process.log()
    finally:
        process.stop()


async def test_fail_at_start_exits_non_zero(tmp_path: Path) -> None:
    process = SimProcess(tmp_path, "--fail-at-start", "--startup-delay", "0.2")
    try:
        code = await asyncio.to_thread(process.proc.wait, 15)
        assert code == 1
        assert "fail-at-start" in process.log()
        assert "SIMULATOR" in process.log()
    finally:
        process.stop()


async def test_startup_delay_means_not_listening_yet(tmp_path: Path) -> None:
    process = SimProcess(tmp_path, "--startup-delay", "1.2")
    try:
        await asyncio.sleep(0.5)
        async with httpx.AsyncClient(timeout=1.0) as client:
            with pytest.raises(httpx.ConnectError):
                await client.get(process.base_url + "/health")
        elapsed = await asyncio.to_thread(process.wait_healthy)
        assert elapsed >= 1.2
    finally:
        process.stop()
