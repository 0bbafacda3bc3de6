"""Engine specs and runtimes for tests of the manager: simulator processes, and a real process
runtime whose stop can be made to fail."""

from __future__ import annotations

import sys

from orchestrator.runtimes import EngineSpec, ProcessRuntime, RuntimeError_, RuntimeHandle


def simulator_spec(
    port: int,
    *extra: str,
    timeout_s: float = 30.0,
    profile_id: str = "sim",
    api_key: str | None = None,
) -> EngineSpec:
    """A process engine running the simulator as `sim-model` on `port` (flags in `extra`)."""
    return EngineSpec(
        profile_id=profile_id,
        served_model_name="sim-model",
        runtime="process",
        command=(
            sys.executable,
            "-m",
            "simulator",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--model",
            "sim-model",
            *extra,
        ),
        port=port,
        startup_timeout_s=timeout_s,
        api_key=api_key,
    )


class StopFailsRuntime:
    """A real ProcessRuntime whose stop fails while `fail_stop` is set, leaving the engine
    running, as a Docker daemon that times out or a kill that is refused would."""

    name = "process"

    def __init__(self) -> None:
        self._inner = ProcessRuntime()
        self.fail_stop = False
        self.starts = 0

    async def start(self, spec: EngineSpec) -> RuntimeHandle:
        """Launch through the real runtime, counting launches."""
        self.starts += 1
        return await self._inner.start(spec)

    async def stop(self, handle: RuntimeHandle, *, timeout_s: float = 20.0) -> None:
        """Fail without touching the engine while `fail_stop` is set, else really stop it."""
        if self.fail_stop:
            raise RuntimeError_("the stop timed out")
        await self._inner.stop(handle, timeout_s=timeout_s)

    async def is_running(self, handle: RuntimeHandle) -> bool:
        """The real runtime's answer."""
        return await self._inner.is_running(handle)

    def logs_tail(self, handle: RuntimeHandle, lines: int = 50) -> list[str]:
        """The real runtime's log tail."""
        return self._inner.logs_tail(handle, lines)

    async def adopt(self) -> list[RuntimeHandle]:
        """Nothing to adopt in these tests."""
        return []
