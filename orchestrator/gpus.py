"""GPU inventory: NVML on a real host, a recorded JSON snapshot elsewhere, never a crash."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol


@dataclass(frozen=True)
class GpuProcess:
    """A process holding memory on a GPU."""

    pid: int
    used_memory_bytes: int
    name: str = ""
    # Its process group on its host, read there (a Ray node's engines are recognised by it:
    # each engine leads its own group).
    group: int | None = None


@dataclass(frozen=True)
class GpuInfo:
    """One GPU as NVML reports it."""

    index: int
    uuid: str
    name: str
    memory_total_bytes: int
    memory_used_bytes: int
    memory_free_bytes: int
    utilization_percent: int | None = None
    temperature_c: int | None = None
    power_draw_w: float | None = None
    power_limit_w: float | None = None
    processes: tuple[GpuProcess, ...] = ()
    # On a Ray cluster (RAY_ADDRESS): the Ray node this GPU is on and its index there; `index`
    # is then its index in the whole cluster's inventory. Empty on a single host.
    node: str = ""
    node_index: int | None = None

    @property
    def local_index(self) -> int:
        """The GPU's index on its own host (what CUDA_VISIBLE_DEVICES names there)."""
        return self.index if self.node_index is None else self.node_index


@dataclass(frozen=True)
class GpuInventory:
    """All GPUs of a host, where the reading came from, and why it is empty if it is."""

    gpus: tuple[GpuInfo, ...]
    source: str
    reason: str | None = None
    driver_version: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def count(self) -> int:
        """Number of GPUs."""
        return len(self.gpus)

    @property
    def nodes(self) -> tuple[str, ...]:
        """The nodes the GPUs are on, in index order ("" alone on a single host)."""
        return tuple(dict.fromkeys(gpu.node for gpu in self.gpus))

    def on_node(self, node: str) -> GpuInventory:
        """The part of this inventory on one node (indices kept)."""
        return replace(self, gpus=tuple(gpu for gpu in self.gpus if gpu.node == node))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (also the snapshot file format)."""
        return asdict(self)


class GpuReader(Protocol):
    """Anything that can take a GPU reading."""

    def read(self) -> GpuInventory:
        """Return the current inventory."""
        ...


class NvmlReader:
    """Reads GPUs through NVML (`nvidia-ml-py`)."""

    def read(self) -> GpuInventory:
        """Take a reading; no driver or no library gives zero GPUs with the reason."""
        try:
            import pynvml
        except ImportError as exc:  # pragma: no cover - the dependency is declared
            return GpuInventory(gpus=(), source="nvml", reason=f"nvidia-ml-py missing: {exc}")
        try:
            pynvml.nvmlInit()
        except pynvml.NVMLError as exc:
            return GpuInventory(gpus=(), source="nvml", reason=f"NVML unavailable: {exc}")
        try:
            driver = _text(pynvml.nvmlSystemGetDriverVersion())
            gpus = tuple(_read_gpu(pynvml, i) for i in range(pynvml.nvmlDeviceGetCount()))
        except pynvml.NVMLError as exc:
            return GpuInventory(gpus=(), source="nvml", reason=f"NVML read failed: {exc}")
        finally:
            pynvml.nvmlShutdown()
        return GpuInventory(gpus=gpus, source="nvml", driver_version=driver)


class SnapshotError(ValueError):
    """The GPU snapshot file (GPU_SNAPSHOT) is missing, unreadable or not an inventory."""


class SnapshotReader:
    """Reads a recorded inventory from a JSON file (tests, demos, planning elsewhere)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def read(self) -> GpuInventory:
        """Load the snapshot file; SnapshotError naming the file if it cannot be used.

        A configured snapshot that is wrong is a mistake to report, not zero GPUs: planning for
        no GPUs would quietly pick CPU or simulator engines instead.
        """
        where = f"GPU snapshot {self.path} (GPU_SNAPSHOT)"
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            raise SnapshotError(f"{where}: no such file") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise SnapshotError(f"{where}: cannot be read: {exc}") from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise SnapshotError(
                f"{where}: not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
            ) from None
        if not isinstance(data, dict):
            raise SnapshotError(f"{where}: expected a JSON object, got {type(data).__name__}")
        try:
            return inventory_from_dict(data, source=f"snapshot:{self.path}")
        except (TypeError, ValueError, AttributeError) as exc:
            # e.g. an unknown or missing GPU field, or "gpus" that is not a list of objects.
            raise SnapshotError(f"{where}: not a GPU inventory: {exc}") from None


def inventory_from_dict(data: dict[str, Any], *, source: str) -> GpuInventory:
    """Build an inventory from its JSON form."""
    gpus = tuple(
        GpuInfo(
            **{k: v for k, v in gpu.items() if k != "processes"},
            processes=tuple(GpuProcess(**p) for p in gpu.get("processes", ())),
        )
        for gpu in data.get("gpus", ())
    )
    return GpuInventory(
        gpus=gpus,
        source=source,
        reason=data.get("reason"),
        driver_version=data.get("driver_version"),
    )


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _optional(call: Any, *args: Any) -> Any:
    # Consumer boards do not report every field (e.g. power limit); a missing one is None.
    try:
        return call(*args)
    except Exception:
        return None


def _read_gpu(nvml: Any, index: int) -> GpuInfo:
    handle = nvml.nvmlDeviceGetHandleByIndex(index)
    memory = nvml.nvmlDeviceGetMemoryInfo(handle)
    util = _optional(nvml.nvmlDeviceGetUtilizationRates, handle)
    power = _optional(nvml.nvmlDeviceGetPowerUsage, handle)
    limit = _optional(nvml.nvmlDeviceGetEnforcedPowerLimit, handle)
    procs = _optional(nvml.nvmlDeviceGetComputeRunningProcesses, handle) or []
    return GpuInfo(
        index=index,
        uuid=_text(nvml.nvmlDeviceGetUUID(handle)),
        name=_text(nvml.nvmlDeviceGetName(handle)),
        memory_total_bytes=int(memory.total),
        memory_used_bytes=int(memory.used),
        memory_free_bytes=int(memory.free),
        utilization_percent=int(util.gpu) if util is not None else None,
        temperature_c=_optional(nvml.nvmlDeviceGetTemperature, handle, nvml.NVML_TEMPERATURE_GPU),
        power_draw_w=power / 1000 if power is not None else None,
        power_limit_w=limit / 1000 if limit is not None else None,
        processes=tuple(
            GpuProcess(
                pid=int(p.pid),
                used_memory_bytes=int(p.usedGpuMemory or 0),
                group=_process_group(int(p.pid)),
            )
            for p in procs
        ),
    )


def _process_group(pid: int) -> int | None:
    """A process's group on this host; None when it cannot be read (another pid namespace)."""
    try:
        return os.getpgid(pid)
    except OSError:
        return None


def engine_pids_on_nodes(inventory: GpuInventory, groups: Iterable[tuple[str, int]]) -> set[int]:
    """The GPU processes of engines that run on cluster nodes: those whose process group (read
    on their node) is an engine's, given as (node, the engine's group leader pid)."""
    ours = set(groups)
    return {
        process.pid
        for gpu in inventory.gpus
        for process in gpu.processes
        if process.group is not None and (gpu.node, process.group) in ours
    }


def gpu_reader(snapshot: Path | None) -> GpuReader:
    """The snapshot reader when a snapshot is configured, else NVML."""
    return SnapshotReader(snapshot) if snapshot is not None else NvmlReader()
