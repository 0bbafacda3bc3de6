"""An OpenAI-compatible vLLM engine SIMULATOR (no GPU, no model weights).

It stands in for vLLM where there is no GPU: as the engine of the embedded default,
as the upstream of proxy benchmarks and inside test containers. It speaks vLLM's
HTTP surface (``/v1/*``, ``/health``, ``/metrics``, the sleep contract) with
deterministic pseudo-text and can inject faults on demand.

It is its own program, run as a process with ``python -m simulator --help``: nothing in
``gateway`` or ``orchestrator`` imports it (the engine specs name it by module only), so the
control plane never falls back to it in-process. Its fault injection (``--fail-at-start``,
``--die-after-chunks``, ..., ``X-Simulator-*`` headers) and its ``/simulator/*`` routes
(counters, recent request bodies, reset) are for tests only.
"""

from simulator.app import SimulatorApp, create_simulator_app
from simulator.config import SIMULATOR_OWNER, SIMULATOR_VERSION, SimulatorConfig
from simulator.server import SimulatedStartupFailure, create_server, run, serve

__all__ = [
    "SIMULATOR_OWNER",
    "SIMULATOR_VERSION",
    "SimulatedStartupFailure",
    "SimulatorApp",
    "SimulatorConfig",
    "create_server",
    "create_simulator_app",
    "run",
    "serve",
]
