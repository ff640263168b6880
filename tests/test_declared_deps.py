"""Every third-party package the code imports is declared in pyproject.toml: the library's
(pipeline/, evaluation/, jobs/) in `dependencies`, the tests' and benchmarks' there or in the
`dev` extra. Imports are read with `ast` (lazy imports inside functions count too) and mapped
to distributions with importlib.metadata.packages_distributions()."""

from __future__ import annotations

import ast
import re
import sys
from functools import cache
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FIRST_PARTY = {"pipeline", "evaluation", "jobs"}


def normalise(name: str) -> str:
    """PEP 503 names: `PyYAML` and `pyyaml`, `scikit_learn` and `scikit-learn` are one."""
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_name(req: str) -> str:
    """'ray[default,train,tune]>=2.50' -> 'ray' (the name ends where extras or a version start)."""
    match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", req)
    assert match, f"unreadable requirement {req!r} in pyproject.toml"
    return normalise(match.group(1))


@cache
def declared() -> tuple[frozenset[str], frozenset[str]]:
    """(runtime dependency names, dev extra names) from pyproject.toml."""
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    runtime = frozenset(requirement_name(r) for r in project["dependencies"])
    dev = frozenset(requirement_name(r) for r in project["optional-dependencies"]["dev"])
    return runtime, dev


def imported_modules(path: Path) -> set[str]:
    """Top-level names of the absolute imports in one file."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def undeclared(folders: list[str], allowed: frozenset[str]) -> list[str]:
    """'file: import X (distributions ...)' for every third-party import outside `allowed`."""
    dists = packages_distributions()
    problems = []
    files = [f for folder in folders for f in sorted((REPO / folder).rglob("*.py"))]
    # Modules of the scanned folders themselves: benchmarks/machine.py, conftest, the tests'
    # server harness that a benchmark reuses.
    local = FIRST_PARTY | {f.stem for f in files}
    for path in files:
        for mod in sorted(imported_modules(path) - local - set(sys.stdlib_module_names)):
            found = {normalise(d) for d in dists.get(mod, [])}
            if not found & allowed:
                where = path.relative_to(REPO)
                problems.append(f"{where}: import {mod} (distributions {sorted(found)})")
    return problems


def test_the_library_declares_every_import():
    runtime, _ = declared()
    assert undeclared(["pipeline", "evaluation", "jobs"], runtime) == []


def test_tests_and_benchmarks_declare_every_import():
    runtime, dev = declared()
    assert undeclared(["tests", "benchmarks"], runtime | dev) == []


def test_the_check_sees_an_undeclared_import(tmp_path, monkeypatch):
    """The checker itself: a file importing something undeclared is reported, by name."""
    monkeypatch.setattr(sys.modules[__name__], "REPO", tmp_path)
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "a.py").write_text(
        "import os\nimport numpy as np\nfrom pipeline import config\n"
        "def f():\n    import yaml\n    from . import b\n"
    )
    assert undeclared(["pkg"], frozenset({"numpy"})) == [
        "pkg/a.py: import yaml (distributions ['pyyaml'])"
    ]
    assert undeclared(["pkg"], frozenset({"numpy", "pyyaml"})) == []
