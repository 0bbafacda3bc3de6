"""Fixtures of this folder (helpers in tests/helpers/profiles.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tests.helpers.profiles import switching_profiles


@pytest.fixture
def profiles_file(tmp_path: Path) -> Path:
    """model_profiles.yml with the switching profiles."""
    path = tmp_path / "model_profiles.yml"
    path.write_text(yaml.safe_dump(switching_profiles()))
    return path
