"""The simulator is its own program: the control plane never imports it, nor it the control plane.

Read from the source (every import statement, including ones inside functions), so a lazy
import that would let the gateway fall back to an in-process simulator is caught as well.
"""

from __future__ import annotations

import ast

import pytest

from tests.helpers.paths import REPO


def imported_modules(package: str) -> dict[str, set[str]]:
    """Each source file of `package` (relative path) -> the absolute modules it imports."""
    found: dict[str, set[str]] = {}
    for path in sorted((REPO / package).rglob("*.py")):
        names: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                names.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names.add(node.module)
        found[str(path.relative_to(REPO))] = names
    return found


def importers_of(package: str, forbidden: str) -> list[str]:
    """'file: module' for every import of `forbidden` (or a submodule) inside `package`."""
    return [
        f"{path}: {name}"
        for path, names in imported_modules(package).items()
        for name in sorted(names)
        if name == forbidden or name.startswith(forbidden + ".")
    ]


@pytest.mark.parametrize("package", ["gateway", "orchestrator"])
def test_the_control_plane_never_imports_the_simulator(package: str) -> None:
    assert imported_modules(package), f"no sources found under {package}/"
    assert importers_of(package, "simulator") == []


@pytest.mark.parametrize("forbidden", ["gateway", "orchestrator"])
def test_the_simulator_imports_nothing_of_the_control_plane(forbidden: str) -> None:
    assert importers_of("simulator", forbidden) == []


def test_the_check_sees_a_real_import() -> None:
    # The check above must be able to fail: the simulator's own package imports itself.
    assert "simulator/app.py: simulator.config" in importers_of("simulator", "simulator")
