"""pyproject.toml declares what the package imports: nothing missing, nothing unexplained."""

from __future__ import annotations

import ast
import importlib.metadata as md
import re
import sys
from pathlib import Path

import pytest

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "pytest_hilfarm"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
# Extras that a module or subpackage may rely on instead of the base dependencies.
EXTRA_FOR = {"store/postgresql.py": "postgresql"}


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_name(spec: str) -> str:
    match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", spec)
    assert match, spec
    return normalize(match.group(1))


def declared(extra: str | None = None) -> set[str]:
    project = PYPROJECT["project"]
    specs = project["dependencies"] if extra is None else project["optional-dependencies"][extra]
    return {requirement_name(s) for s in specs}


def third_party_imports() -> dict[str, set[Path]]:
    """Top-level module -> files importing it, for every absolute non-stdlib import."""
    found: dict[str, set[Path]] = {}
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top not in sys.stdlib_module_names and top != "pytest_hilfarm":
                    found.setdefault(top, set()).add(path)
    return found


def distributions_of(module: str) -> set[str]:
    dists = md.packages_distributions().get(module)
    assert dists, f"{module!r} is imported but no installed distribution provides it"
    return {normalize(d) for d in dists}


def test_the_import_walk_sees_the_known_imports() -> None:
    imports = third_party_imports()
    # A walk that found nothing would make the next test pass vacuously.
    assert {"esptool", "serial", "yaml", "esp_pylib", "cryptography"} <= set(imports)


@pytest.mark.parametrize("module", sorted(third_party_imports()))
def test_every_third_party_import_is_declared(module: str) -> None:
    files = third_party_imports()[module]
    allowed = declared()
    for sub, extra in EXTRA_FOR.items():
        if all(f.is_relative_to(PACKAGE / sub) for f in files):
            allowed |= declared(extra)
    dists = distributions_of(module)
    where = ", ".join(sorted(str(f.relative_to(ROOT)) for f in files))
    assert dists & allowed, (
        f"{module!r} (imported by {where}) comes from {sorted(dists)}, which pyproject.toml "
        "does not declare")


def test_every_base_dependency_is_imported_or_explained() -> None:
    imported = set().union(*(distributions_of(m) for m in third_party_imports()))
    # Needed without an import, each for a reason that is checked here.
    plugin = (PACKAGE / "plugin" / "core.py").read_text(encoding="utf-8")
    explained = {
        # The plugin implements xdist's hook; pytest rejects an unknown hook without xdist.
        "pytest-xdist": "def pytest_testnodedown(" in plugin,
        # This repository's pytest configuration (read by `pytest examples/`) sets it.
        "pytest-timeout": "timeout" in PYPROJECT["tool"]["pytest"]["ini_options"],
    }
    for name, still_true in explained.items():
        assert still_true, f"{name} is declared for a reason that no longer holds: drop it"
    unexplained = declared() - imported - set(explained)
    assert not unexplained, f"declared but never imported: {sorted(unexplained)}"


def test_security_library_has_no_upper_bound() -> None:
    spec = next(s for s in PYPROJECT["project"]["dependencies"]
                if requirement_name(s) == "cryptography")
    assert "<" not in spec, spec
