"""GPU inventory: the recorded dual-3090 snapshot, and NVML on a machine without a driver."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from orchestrator.gpus import NvmlReader, SnapshotReader, gpu_reader, inventory_from_dict

SNAPSHOT = Path(__file__).parent.parent / "fixtures" / "gpu" / "dual_rtx3090.json"
MIB = 1024 * 1024


def test_snapshot_reads_two_rtx_3090() -> None:
    inventory = SnapshotReader(SNAPSHOT).read()
    assert inventory.count == 2
    assert inventory.source.startswith("snapshot:")
    assert inventory.driver_version == "550.120"
    for gpu in inventory.gpus:
        assert gpu.name == "NVIDIA GeForce RTX 3090"
        assert gpu.memory_total_bytes == 24576 * MIB
        assert gpu.memory_used_bytes + gpu.memory_free_bytes == gpu.memory_total_bytes
        assert gpu.power_limit_w == 350.0
    assert [p.pid for p in inventory.gpus[0].processes] == [1873, 2411]
    assert inventory.gpus[1].processes == ()


def test_inventory_round_trips_through_its_json_form() -> None:
    inventory = SnapshotReader(SNAPSHOT).read()
    again = inventory_from_dict(json.loads(json.dumps(inventory.to_dict())), source="copy")
    assert again.gpus == inventory.gpus


def test_gpu_reader_picks_snapshot_when_configured() -> None:
    assert isinstance(gpu_reader(SNAPSHOT), SnapshotReader)
    assert isinstance(gpu_reader(None), NvmlReader)


def test_nvml_without_driver_is_zero_gpus_with_reason() -> None:
    inventory = NvmlReader().read()
    if inventory.count:
        pytest.skip("this machine has a working NVIDIA driver; the no-driver path cannot run")
    assert inventory.gpus == ()
    assert inventory.source == "nvml"
    assert inventory.reason
    assert "NVML" in inventory.reason
