"""Finding the real tools the deploy tests run (installed by scripts/bootstrap-system.sh)."""

from __future__ import annotations

import os
import shutil

import pytest


def require_tool(name: str) -> str:
    """The tool's path; a skip (a failure under the test command) when it is missing."""
    found = shutil.which(name)
    if found is not None:
        return found
    reason = f"{name} is not installed (scripts/bootstrap-system.sh installs it)"
    if os.environ.get("VCG_REQUIRE_ALL") == "1" or os.environ.get("CI"):
        pytest.fail(reason, pytrace=False)
    pytest.skip(reason)
