"""Runtimes start and stop engines: local processes, Docker containers, external URLs."""

from orchestrator.runtimes.base import EngineSpec, Runtime, RuntimeError_, RuntimeHandle
from orchestrator.runtimes.external import ExternalRuntime
from orchestrator.runtimes.process import ProcessRuntime

__all__ = [
    "EngineSpec",
    "ExternalRuntime",
    "ProcessRuntime",
    "Runtime",
    "RuntimeError_",
    "RuntimeHandle",
]
