"""An engine someone else runs: the gateway only routes to its URL."""

from __future__ import annotations

from orchestrator.runtimes.base import EngineSpec, RuntimeError_, RuntimeHandle


def engine_root_url(url: str) -> str:
    """Strip a trailing `/v1` (OpenAI base URLs) to get the engine's root."""
    root = url.rstrip("/")
    return root[: -len("/v1")] if root.endswith("/v1") else root


class ExternalRuntime:
    """Adopts an engine at a fixed URL; start and stop do not touch the process."""

    name = "external"

    async def start(self, spec: EngineSpec) -> RuntimeHandle:
        """Record the URL; readiness is the manager's health check."""
        if not spec.base_url:
            raise RuntimeError_(f"profile {spec.profile_id!r}: external runtime needs a base_url")
        root = engine_root_url(spec.base_url)
        return RuntimeHandle(
            runtime=self.name,
            id=root,
            base_url=root,
            profile_id=spec.profile_id,
            api_key=spec.api_key,
        )

    async def stop(self, handle: RuntimeHandle, *, timeout_s: float = 20.0) -> None:
        """Nothing to stop: the engine is not ours."""
        del handle, timeout_s

    async def is_running(self, handle: RuntimeHandle) -> bool:
        """Unknown from here; the health check decides."""
        del handle
        return True

    def logs_tail(self, handle: RuntimeHandle, lines: int = 50) -> list[str]:
        """An external engine's logs are not visible to the gateway."""
        del handle, lines
        return []

    async def adopt(self) -> list[RuntimeHandle]:
        """Nothing to adopt: an external engine is configured, not discovered."""
        return []
