"""The test tree mirrors the source tree, and shared helpers live in tests/helpers/.

- every folder of tests under `tests/<package>/...` names a package (or module) that exists
  under the same path in the source tree;
- no test module or helper imports a `conftest` (conftests hold fixtures only; what several
  files share is a module of `tests/helpers/`).
"""

from __future__ import annotations

import ast
from pathlib import Path

from tests.helpers.paths import REPO

TESTS = REPO / "tests"
# Folders of tests/ that mirror no source package, and why.
NOT_MIRRORS = {
    "helpers",  # shared test helpers (real services, apps, clients)
    "fixtures",  # recorded data (GPU snapshots, profiles)
    "alembic",  # the migrations (alembic/ at the top level)
    "scripts",  # scripts/ (the two README commands)
    "deploy",  # deploy/ (image, compose, dashboards)
}


def _test_folders() -> list[Path]:
    return sorted(
        path.parent
        for path in TESTS.rglob("test_*.py")
        if path.parent != TESTS and path.relative_to(TESTS).parts[0] not in NOT_MIRRORS
    )


def _mirrors(folder: Path) -> bool:
    source = REPO / folder.relative_to(TESTS)
    return source.is_dir() or source.with_suffix(".py").is_file()


def test_every_test_folder_mirrors_a_source_package() -> None:
    folders = _test_folders()
    assert folders, "no test folders found: the check would pass vacuously"
    strays = [str(folder.relative_to(REPO)) for folder in folders if not _mirrors(folder)]
    assert strays == [], f"test folders with no source package of that path: {strays}"


def test_the_mirror_check_catches_a_stray_folder() -> None:
    assert _mirrors(TESTS / "gateway" / "proxy")
    assert _mirrors(TESTS / "orchestrator" / "runtimes")
    assert not _mirrors(TESTS / "gateway" / "quota")
    assert not _mirrors(TESTS / "observability")


def _imports_a_conftest(path: Path, root: Path = REPO) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            module = node.module or ""
            names = [alias.name for alias in node.names]
            if module.split(".")[-1] == "conftest" or "conftest" in names:
                found.append(f"{path.relative_to(root)}:{node.lineno}")
        elif isinstance(node, ast.Import):
            found.extend(
                f"{path.relative_to(root)}:{node.lineno}"
                for alias in node.names
                if alias.name.split(".")[-1] == "conftest"
            )
    return found


def test_nothing_imports_a_conftest() -> None:
    offenders = [hit for path in sorted(TESTS.rglob("*.py")) for hit in _imports_a_conftest(path)]
    assert offenders == [], (
        f"import shared helpers from tests/helpers/, not a conftest: {offenders}"
    )


def test_the_conftest_check_catches_both_spellings(tmp_path: Path) -> None:
    sample = tmp_path / "sample.py"
    sample.write_text("from .conftest import x\nfrom tests.gateway import conftest\n")
    assert len(_imports_a_conftest(sample, tmp_path)) == 2
