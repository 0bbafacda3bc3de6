"""Where things are in the checkout."""

from __future__ import annotations

from pathlib import Path

#: The repository root.
REPO = Path(__file__).resolve().parents[2]
#: The recorded NVML reading of a dual-RTX-3090 host (GPU tests on machines without a GPU).
DUAL_3090_SNAPSHOT = REPO / "tests" / "fixtures" / "gpu" / "dual_rtx3090.json"
