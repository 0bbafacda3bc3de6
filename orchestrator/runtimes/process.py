"""Engines as local child processes (the simulator, or vLLM without Docker)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections import deque
from dataclasses import dataclass

from orchestrator.runtimes.base import EngineSpec, RuntimeError_, RuntimeHandle

_LOG_LINES = 500


@dataclass
class _Child:
    process: asyncio.subprocess.Process
    logs: deque[str]
    reader: asyncio.Task[None]


class ProcessRuntime:
    """Runs `spec.command` as a child process in its own process group."""

    name = "process"

    def __init__(self) -> None:
        self._children: dict[str, _Child] = {}

    async def start(self, spec: EngineSpec) -> RuntimeHandle:
        """Spawn the command; its output is kept in a ring buffer for `logs_tail`."""
        if not spec.command:
            raise RuntimeError_(f"profile {spec.profile_id!r}: process runtime needs a command")
        if spec.port is None:
            raise RuntimeError_(f"profile {spec.profile_id!r}: process runtime needs a port")
        try:
            process = await asyncio.create_subprocess_exec(
                *spec.command,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
                env={**os.environ, **spec.env},
                # Its own group, so stop() also ends the engine's worker processes.
                start_new_session=True,
            )
        except OSError as exc:
            raise RuntimeError_(f"cannot start {spec.command[0]!r}: {exc}") from exc
        logs: deque[str] = deque(maxlen=_LOG_LINES)
        reader = asyncio.create_task(_pump(process, logs), name=f"logs-{spec.profile_id}")
        handle = RuntimeHandle(
            runtime=self.name, id=str(process.pid), base_url=f"http://127.0.0.1:{spec.port}"
        )
        self._children[handle.id] = _Child(process=process, logs=logs, reader=reader)
        return handle

    async def stop(self, handle: RuntimeHandle, *, timeout_s: float = 20.0) -> None:
        """SIGTERM the group, then SIGKILL after the timeout."""
        child = self._children.pop(handle.id, None)
        if child is None:
            return
        if child.process.returncode is None:
            _signal_group(child.process.pid, signal.SIGTERM)
            try:
                await asyncio.wait_for(child.process.wait(), timeout_s)
            except TimeoutError:
                _signal_group(child.process.pid, signal.SIGKILL)
                await child.process.wait()
        with contextlib.suppress(asyncio.CancelledError):
            await child.reader

    async def is_running(self, handle: RuntimeHandle) -> bool:
        """True while the child has not exited."""
        child = self._children.get(handle.id)
        return child is not None and child.process.returncode is None

    def logs_tail(self, handle: RuntimeHandle, lines: int = 50) -> list[str]:
        """The last lines of the child's combined stdout/stderr."""
        child = self._children.get(handle.id)
        return list(child.logs)[-lines:] if child else []

    def exit_code(self, handle: RuntimeHandle) -> int | None:
        """The child's exit code once it has exited."""
        child = self._children.get(handle.id)
        return child.process.returncode if child else None


def _signal_group(pid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


async def _pump(process: asyncio.subprocess.Process, logs: deque[str]) -> None:
    assert process.stdout is not None
    async for raw in process.stdout:
        logs.append(raw.decode(errors="replace").rstrip())
