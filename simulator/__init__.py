"""An OpenAI-compatible vLLM engine SIMULATOR (no GPU, no model weights).

It stands in for vLLM where there is no GPU: as the engine of the embedded default,
as the upstream of proxy benchmarks and inside test containers. It speaks vLLM's
HTTP surface (``/v1/*``, ``/health``, ``/metrics``, the sleep contract) with
deterministic pseudo-text and can inject faults on demand.

Run it as a process with ``python -m orchestrator.simulator --help``.
"""

from orchestrator.simulator.app import SimulatorApp, create_simulator_app
from orchestrator.simulator.config import SIMULATOR_OWNER, SIMULATOR_VERSION, SimulatorConfig
from orchestrator.simulator.server import SimulatedStartupFailure, create_server, run, serve

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
