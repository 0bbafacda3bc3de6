"""The Runtime protocol every engine backend implements."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol


class RuntimeError_(Exception):
    """A runtime could not do what it was asked; the message says why."""


@dataclass(frozen=True)
class EngineSpec:
    """Everything a runtime needs to run one engine (built from a validated profile)."""

    profile_id: str
    served_model_name: str
    runtime: str
    aliases: tuple[str, ...] = ()
    command: tuple[str, ...] = ()
    env: dict[str, str] = field(default_factory=dict)
    port: int | None = None
    base_url: str | None = None
    health_path: str = "/health"
    startup_timeout_s: float = 600.0
    api_key: str | None = None


@dataclass(frozen=True)
class RuntimeHandle:
    """A running engine: an id the runtime understands and the engine's root URL."""

    runtime: str
    id: str
    base_url: str


class Runtime(Protocol):
    """Start, stop and watch engines of one kind."""

    name: str

    async def start(self, spec: EngineSpec) -> RuntimeHandle:
        """Launch the engine; return once launched (readiness is checked by the manager)."""
        ...

    async def stop(self, handle: RuntimeHandle, *, timeout_s: float = 20.0) -> None:
        """Stop the engine; force it after the timeout."""
        ...

    async def is_running(self, handle: RuntimeHandle) -> bool:
        """False once the engine has exited."""
        ...

    def logs_tail(self, handle: RuntimeHandle, lines: int = 50) -> list[str]:
        """The last lines the engine printed."""
        ...
