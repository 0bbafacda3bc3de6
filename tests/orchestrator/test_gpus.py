"""GPU inventory: the recorded dual-3090 snapshot, and NVML on a machine without a driver."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from orchestrator.gpus import (
    GpuInfo,
    GpuInventory,
    GpuProcess,
    NvmlReader,
    SnapshotError,
    SnapshotReader,
    engine_pids_on_nodes,
    gpu_reader,
    inventory_from_dict,
)

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


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (None, "no such file"),
        ('{"gpus": [', "not valid JSON: Expecting value at line 1 column 11"),
        ("[]", "expected a JSON object, got list"),
        ('{"gpus": [{"index": 0, "name": "RTX"}]}', "not a GPU inventory"),
        ('{"gpus": 2}', "not a GPU inventory"),
    ],
    ids=["missing", "truncated", "not-an-object", "missing-fields", "gpus-not-a-list"],
)
def test_a_bad_snapshot_file_is_a_clear_error_naming_it(
    tmp_path: Path, content: str | None, problem: str
) -> None:
    path = tmp_path / "snapshot.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(SnapshotError) as caught:
        SnapshotReader(path).read()
    message = str(caught.value)
    assert message.startswith(f"GPU snapshot {path} (GPU_SNAPSHOT): ")
    assert problem in message
    # Reported as ours alone: no FileNotFoundError / JSONDecodeError chained into the traceback.
    error = caught.value
    assert error.__cause__ is None
    assert error.__context__ is None or error.__suppress_context__


def test_nvml_without_driver_is_zero_gpus_with_reason() -> None:
    inventory = NvmlReader().read()
    if inventory.count:
        pytest.skip("this machine has a working NVIDIA driver; the no-driver path cannot run")
    assert inventory.gpus == ()
    assert inventory.source == "nvml"
    assert inventory.reason
    assert "NVML" in inventory.reason


def test_engines_on_cluster_nodes_are_recognised_by_their_group_on_their_node() -> None:
    def gpu(index: int, node: str, *processes: GpuProcess) -> GpuInfo:
        return GpuInfo(
            index=index,
            uuid=f"GPU-{index}",
            name="NVIDIA GeForce RTX 3090",
            memory_total_bytes=24 * 1024**3,
            memory_used_bytes=20 * 1024**3,
            memory_free_bytes=4 * 1024**3,
            processes=processes,
            node=node,
            node_index=index % 2,
        )

    engine_worker = GpuProcess(pid=5001, used_memory_bytes=18 * 1024**3, group=5000)
    same_pid_elsewhere = GpuProcess(pid=5002, used_memory_bytes=1024**3, group=5000)
    unknown_group = GpuProcess(pid=7000, used_memory_bytes=1024**3)
    inventory = GpuInventory(
        gpus=(
            gpu(0, "node-a", engine_worker, unknown_group),
            gpu(2, "node-b", same_pid_elsewhere),
        ),
        source="ray: 2 nodes",
    )
    # The engine leads group 5000 on node A; group 5000 on node B is someone else's.
    assert engine_pids_on_nodes(inventory, [("node-a", 5000)]) == {5001}
    assert engine_pids_on_nodes(inventory, []) == set()
    assert inventory.on_node("node-b").gpus == (inventory.gpus[1],)
    assert inventory.nodes == ("node-a", "node-b")
