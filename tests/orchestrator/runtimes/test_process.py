"""ProcessRuntime with log files and state files: real simulator processes, real adoption."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import signal
import stat
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from orchestrator.runtimes import EngineSpec, RuntimeHandle
from orchestrator.runtimes.process import ProcessRuntime
from tests.helpers.paths import REPO
from tests.helpers.ports import free_port, wait_port_closed

# The "previous gateway": starts the engine through ProcessRuntime, prints the handle, exits.
_OLD_GATEWAY = """
import asyncio, json, sys
from pathlib import Path
from orchestrator.runtimes import EngineSpec
from orchestrator.runtimes.process import ProcessRuntime

async def main() -> None:
    args = json.loads(sys.argv[1])
    runtime = ProcessRuntime(instance=args["instance"], state_dir=Path(args["state_dir"]))
    spec = EngineSpec(profile_id="sim", served_model_name="sim-model", runtime="process",
                      command=tuple(args["command"]), port=args["port"],
                      env={"PYTHONPATH": args["root"]}, api_key=args["api_key"])
    handle = await runtime.start(spec)
    print(json.dumps({"id": handle.id, "base_url": handle.base_url}), flush=True)

asyncio.run(main())
"""


def _simulator_command(port: int) -> tuple[str, ...]:
    return (
        sys.executable, "-m", "simulator",
        "--host", "127.0.0.1", "--port", str(port), "--model", "sim-model",
    )  # fmt: skip


def _spec(port: int, log_path: Path | None = None, api_key: str | None = None) -> EngineSpec:
    return EngineSpec(
        profile_id="sim",
        served_model_name="sim-model",
        runtime="process",
        command=_simulator_command(port),
        env={"PYTHONPATH": str(REPO)},
        port=port,
        log_path=log_path,
        api_key=api_key,
    )


def _instance() -> str:
    return f"t{uuid.uuid4().hex[:8]}"


def _alive(pid: int) -> bool:
    """Exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rfind(")") + 2] not in "ZX"


def _start_ticks(pid: int) -> int:
    """Field 22 of /proc/PID/stat: when the process started, in clock ticks since boot."""
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])


def _kill_group(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


async def _wait_models(
    base_url: str, within_s: float = 20.0, api_key: str | None = None
) -> list[str]:
    deadline = time.monotonic() + within_s
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    async with httpx.AsyncClient(headers=headers) as http:
        while True:
            try:
                response = await http.get(base_url + "/v1/models", timeout=2.0)
                if response.status_code == 200:
                    return [m["id"] for m in response.json()["data"]]
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{base_url} not serving after {within_s} s")
            await asyncio.sleep(0.05)


def _write_state(state_dir: Path, name: str, **state: object) -> Path:
    state_dir.mkdir(parents=True, exist_ok=True)
    path = state_dir / f"{name}.json"
    path.write_text(json.dumps(state))
    return path


@pytest.fixture
def sleeper() -> Iterator[int]:
    """An unrelated live process (`sleep 60`) in its own group; its pid."""
    import subprocess

    proc = subprocess.Popen(["sleep", "60"], start_new_session=True)
    # Popen returns a moment before the kernel shows the new command line in /proc; the tests
    # compare against it, so wait until it is there.
    deadline = time.monotonic() + 5
    while not Path(f"/proc/{proc.pid}/cmdline").read_bytes() and time.monotonic() < deadline:
        time.sleep(0.001)
    try:
        yield proc.pid
    finally:
        proc.kill()
        proc.wait()


async def test_output_goes_to_the_log_file_and_a_state_file_is_kept(tmp_path: Path) -> None:
    port = free_port()
    log_path = tmp_path / "logs" / "engine" / "sim.log"  # its directory does not exist yet
    state_dir = tmp_path / "state"
    runtime = ProcessRuntime(instance=_instance(), state_dir=state_dir)
    handle = await runtime.start(_spec(port, log_path, api_key="engine-key-1"))
    try:
        assert handle.profile_id == "sim"
        assert handle.base_url == f"http://127.0.0.1:{port}"
        assert handle.api_key == "engine-key-1"
        assert await _wait_models(handle.base_url, api_key="engine-key-1") == ["sim-model"]
        # The runtime gave the engine its key (VLLM_API_KEY): without it, /v1 is refused.
        async with httpx.AsyncClient() as http:
            assert (await http.get(handle.base_url + "/v1/models")).status_code == 401
        assert await runtime.is_running(handle)

        text = log_path.read_text()
        assert "SIMULATOR starting its HTTP server" in text
        tail = runtime.logs_tail(handle, 50)
        assert any("SIMULATOR starting its HTTP server" in line for line in tail)
        assert tail == text.splitlines()[-50:]
        assert runtime.logs_tail(handle, 1) == tail[-1:]

        state = json.loads((state_dir / "sim.json").read_text())
        assert state["pid"] == int(handle.id)
        assert state["port"] == port
        assert state["profile_id"] == "sim"
        assert state["base_url"] == handle.base_url
        assert state["cmdline"] == list(_simulator_command(port))
        assert state["instance"] == runtime.instance
        assert state["log_path"] == str(log_path)
        assert abs(state["started_at"] - time.time()) < 60
        # The key is kept for adoption, in a file that only the gateway's user can read.
        assert state["api_key"] == "engine-key-1"
        assert stat.S_IMODE((state_dir / "sim.json").stat().st_mode) == 0o600
        assert list(state_dir.glob(".*.tmp")) == []
    finally:
        await runtime.stop(handle, timeout_s=10)
    assert not _alive(int(handle.id))
    assert not await runtime.is_running(handle)
    assert not (state_dir / "sim.json").exists()
    wait_port_closed(port, timeout=5)
    # The file outlives the engine; its output is still there.
    assert "SIMULATOR starting its HTTP server" in log_path.read_text()


async def test_a_restarted_gateway_adopts_the_engine_and_stops_it(tmp_path: Path) -> None:
    port = free_port()
    state_dir = tmp_path / "state"
    instance = _instance()
    args = {
        "instance": instance,
        "state_dir": str(state_dir),
        "port": port,
        "command": list(_simulator_command(port)),
        "root": str(REPO),
        "api_key": "old-gateway-key",
    }
    old_gateway = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _OLD_GATEWAY, json.dumps(args),
        cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(old_gateway.communicate(), 30)
    assert old_gateway.returncode == 0, err.decode()
    started = json.loads(out)
    pid = int(started["id"])
    try:
        # The old gateway has exited; its engine runs on, with no pipe to write into.
        assert await _wait_models(started["base_url"], api_key="old-gateway-key") == ["sim-model"]
        assert _alive(pid)

        other = await ProcessRuntime(instance=_instance(), state_dir=state_dir).adopt()
        assert other == []
        assert (state_dir / "sim.json").exists()  # another instance's file is left alone

        runtime = ProcessRuntime(instance=instance, state_dir=state_dir)
        adopted = await runtime.adopt()
        assert adopted == [
            RuntimeHandle(
                runtime="process",
                id=str(pid),
                base_url=f"http://127.0.0.1:{port}",
                profile_id="sim",
                api_key="old-gateway-key",  # read back from the state file
            )
        ]
        handle = adopted[0]
        assert await runtime.is_running(handle)
        assert await _wait_models(handle.base_url, api_key=handle.api_key) == ["sim-model"]
        # Default log file in the state dir; logs_tail reads it for an adopted engine.
        assert any("SIMULATOR starting" in line for line in runtime.logs_tail(handle, 20))
        assert (state_dir / "sim.log").exists()

        await runtime.stop(handle, timeout_s=10)
        assert not _alive(pid)
        assert not await runtime.is_running(handle)
        assert not (state_dir / "sim.json").exists()
        wait_port_closed(port, timeout=5)
        assert await ProcessRuntime(instance=instance, state_dir=state_dir).adopt() == []
    finally:
        _kill_group(pid)


async def test_a_state_file_of_a_dead_process_is_deleted(tmp_path: Path) -> None:
    state_dir = tmp_path / "state"
    instance = _instance()
    dead = await asyncio.create_subprocess_exec("true")
    await dead.wait()
    stale = _write_state(
        state_dir, "gone", pid=dead.pid, port=1, profile_id="gone", base_url="http://127.0.0.1:1",
        cmdline=["true"], started_at=time.time(), instance=instance,
        log_path=str(tmp_path / "gone.log"),
    )  # fmt: skip
    unreadable = state_dir / "broken.json"
    unreadable.write_text("{not json")

    assert await ProcessRuntime(instance=instance, state_dir=state_dir).adopt() == []
    assert not stale.exists()
    assert not unreadable.exists()


async def test_a_reused_pid_is_not_adopted(tmp_path: Path, sleeper: int) -> None:
    """A live pid running another command line is a reused pid: not adopted, file deleted."""
    state_dir = tmp_path / "state"
    instance = _instance()
    common = {
        "pid": sleeper, "port": 1, "profile_id": "sim", "base_url": "http://127.0.0.1:1",
        "started_at": time.time(), "instance": instance, "log_path": str(tmp_path / "x.log"),
    }  # fmt: skip
    reused = _write_state(state_dir, "sim", cmdline=list(_simulator_command(1)), **common)

    runtime = ProcessRuntime(instance=instance, state_dir=state_dir)
    assert await runtime.adopt() == []
    assert not reused.exists()
    assert _alive(sleeper)  # never signalled

    # Same command line but another start time: also a different process.
    start_ticks = _start_ticks(sleeper)
    wrong_start = _write_state(
        state_dir, "sim", cmdline=["sleep", "60"], start_ticks=start_ticks + 1, **common
    )
    assert await runtime.adopt() == []
    assert not wrong_start.exists()
    assert _alive(sleeper)

    # The control: the recorded command line and start time of that very process do match.
    matching = _write_state(
        state_dir, "sim", cmdline=["sleep", "60"], start_ticks=start_ticks, **common
    )
    adopted = await runtime.adopt()
    assert [h.id for h in adopted] == [str(sleeper)]
    assert await runtime.is_running(adopted[0])
    started = time.monotonic()
    await runtime.stop(adopted[0], timeout_s=5)
    assert time.monotonic() - started < 5  # sleep dies of SIGTERM at once
    assert not _alive(sleeper)
    assert not matching.exists()


async def _proc_environ(pid: int) -> dict[str, str]:
    """The environment the process was started with (as the kernel shows it)."""
    path = Path(f"/proc/{pid}/environ")
    # Empty for a moment right after the spawn, until the kernel has set up the new image.
    for _ in range(500):
        raw = path.read_bytes()
        if raw:
            break
        await asyncio.sleep(0.01)
    pairs = (item.decode().partition("=") for item in raw.split(b"\0") if item)
    return {key: value for key, _, value in pairs}


def _command_spec(command: tuple[str, ...], log_path: Path | None, **env: str) -> EngineSpec:
    """A `command` engine: any program (it need not serve HTTP for these tests)."""
    return EngineSpec(
        profile_id="cmd",
        served_model_name="cmd-model",
        runtime="process",
        command=command,
        env=env,
        port=free_port(),
        log_path=log_path,
    )


async def _wait_log_line(
    runtime: ProcessRuntime, handle: RuntimeHandle, prefix: str, within_s: float = 10.0
) -> str:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        for line in runtime.logs_tail(handle, 20):
            if line.startswith(prefix):
                return line[len(prefix) :]
        await asyncio.sleep(0.02)
    raise TimeoutError(f"no {prefix!r} line: {runtime.logs_tail(handle, 20)}")


@pytest.mark.parametrize("detached", [False, True], ids=["piped", "detached"])
async def test_an_engine_inherits_only_the_allow_listed_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, detached: bool
) -> None:
    # Every gateway setting is covered by tests/gateway/test_engine_access.py; these are the
    # prefixes an engine once inherited (VLLM_*, HF_*) and secret names under an allowed prefix.
    for name in ("VLLM_API_KEY", "VLLM_BASE_URL", "HF_TOKEN", "HF_ENDPOINT", "SIMULATOR_API_KEY"):
        monkeypatch.setenv(name, f"gateway-{name.lower()}")
    monkeypatch.setenv("LC_ALL", "C.UTF-8")
    monkeypatch.setenv("CUDA_DEVICE_ORDER", "FASTEST_FIRST")
    monkeypatch.setenv("SIMULATOR_TOKENS_PER_SECOND", "7")
    spec = dataclasses.replace(
        _command_spec(
            ("sleep", "30"),
            tmp_path / "cmd.log" if detached else None,
            CUDA_DEVICE_ORDER="PCI_BUS_ID",
            ENGINE_ONLY="1",
            VLLM_API_KEY="from-the-profile",
        ),
        api_key="engine-key",
    )
    runtime = ProcessRuntime(instance=_instance())
    handle = await runtime.start(spec)
    try:
        env = await _proc_environ(int(handle.id))
    finally:
        await runtime.stop(handle, timeout_s=5)
    assert not any(value.startswith("gateway-") for value in env.values()), env
    assert "HF_TOKEN" not in env
    assert "SIMULATOR_API_KEY" not in env
    assert env["PATH"] == os.environ["PATH"]
    assert env["LC_ALL"] == "C.UTF-8"
    assert env["SIMULATOR_TOKENS_PER_SECOND"] == "7"
    # The spec's env is added and wins over what is inherited ...
    assert env["ENGINE_ONLY"] == "1"
    assert env["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"
    # ... and the runtime's API key wins over both.
    assert env["VLLM_API_KEY"] == "engine-key"
    assert handle.api_key == "engine-key"


# Ignores SIGTERM (and so does its child, which inherits the ignored disposition): only SIGKILL
# of the whole group ends both.
_STUBBORN = ("sh", "-c", 'trap "" TERM; sleep 300 & echo "child=$!"; wait')


@pytest.mark.parametrize("detached", [False, True], ids=["piped", "detached"])
async def test_stop_escalates_to_sigkill_and_kills_the_whole_group(
    tmp_path: Path, detached: bool
) -> None:
    runtime = ProcessRuntime(instance=_instance())
    handle = await runtime.start(_command_spec(_STUBBORN, tmp_path / "s.log" if detached else None))
    leader = int(handle.id)
    child = int(await _wait_log_line(runtime, handle, "child="))
    try:
        assert _alive(leader)
        assert _alive(child)
        assert os.getpgid(child) == leader  # the grandchild is in the engine's group
        started = time.monotonic()
        await runtime.stop(handle, timeout_s=1.0)
        elapsed = time.monotonic() - started
        # SIGTERM was ignored for the whole timeout, then SIGKILL ended it at once.
        assert 0.9 <= elapsed < 4.0, elapsed
        assert not _alive(leader)
        assert not await runtime.is_running(handle)
        for _ in range(100):  # a SIGKILLed process may take a moment to disappear
            if not _alive(child):
                break
            await asyncio.sleep(0.02)
        assert not _alive(child)
    finally:
        _kill_group(leader)
        with contextlib.suppress(ProcessLookupError):
            os.kill(child, signal.SIGKILL)
