"""Every third-party import is a declared distribution of pyproject.toml.

The packages and ``examples/`` may import only the ``[project]`` dependencies; ``tests/`` may also import the
``dev`` extra. Imports are read with ``ast`` (those inside functions too), mapped to distributions with
``importlib.metadata.packages_distributions()`` and compared by PEP 503 normalised name.
"""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from functools import cache
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
PACKAGES = sorted(pattern.rstrip("*") for pattern in PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"])
# tests/fixtures/make_hps_expected.py runs in its own scratch environment with hpsv2 (see its docstring).
NOT_CHECKED = [ROOT / "tests" / "fixtures"]


def normalise(name: str) -> str:
    """PEP 503: runs of ``-``, ``_`` and ``.`` become one ``-``, lower case."""
    return re.sub(r"[-_.]+", "-", name).lower()


def declared(requirements: list[str]) -> set[str]:
    """Normalised distribution names of PEP 508 requirement strings (``ray[data]==2.60.0`` -> ``ray``)."""
    return {normalise(re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", line).group(1)) for line in requirements}


RUNTIME = declared(PYPROJECT["project"]["dependencies"])
DEV = RUNTIME | declared(PYPROJECT["project"]["optional-dependencies"]["dev"])


def imported(path: Path) -> list[tuple[int, str]]:
    """(line, top-level module) of every absolute import in ``path``, wherever it sits in the file."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name.split(".")[0]) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module.split(".")[0]))
    return found


@cache
def installed_distributions() -> dict[str, list[str]]:
    """Import name -> installed distributions providing it (slow: reads every installed package's metadata)."""
    return packages_distributions()


def undeclared(files: list[Path], allowed: set[str], own: set[str]) -> list[str]:
    """One line per import of ``files`` that is neither stdlib, nor ``own``, nor a distribution in ``allowed``."""
    distributions = installed_distributions()
    problems = []
    for path in files:
        for line, module in imported(path):
            if module in sys.stdlib_module_names or module in own:
                continue
            # Not installed here: the import name is the best guess at its distribution's name.
            candidates = distributions.get(module, [module])
            if not any(normalise(name) in allowed for name in candidates):
                problems.append(f"{path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}:{line}: "
                                f"import {module} needs distribution {' or '.join(candidates)}, not declared")
    return problems


def python_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*.py") if not any(p.is_relative_to(skip) for skip in NOT_CHECKED))


def test_every_top_level_package_is_packaged_and_checked():
    on_disk = sorted(p.parent.name for p in ROOT.glob("*/__init__.py"))
    assert on_disk == PACKAGES, "add each top-level package to [tool.setuptools.packages.find] include"


@pytest.mark.parametrize("folder", [*PACKAGES, "examples"])
def test_package_imports_are_project_dependencies(folder):
    problems = undeclared(python_files(ROOT / folder), RUNTIME, set(PACKAGES))
    assert not problems, "declare these in pyproject.toml [project] dependencies or drop the imports:\n" + \
        "\n".join(problems)


def test_test_imports_are_dependencies_or_dev_extra():
    tests = ROOT / "tests"
    local = {p.stem for p in tests.rglob("*.py")} | {p.name for p in tests.iterdir() if p.is_dir()} | {"tests"}  # scripts import their folder's siblings
    problems = undeclared(python_files(tests), DEV, set(PACKAGES) | local)
    assert not problems, "declare these in pyproject.toml's dev extra (or [project] dependencies):\n" + \
        "\n".join(problems)


def test_the_check_names_file_import_and_distribution(tmp_path):
    script = tmp_path / "uses.py"
    script.write_text("import os\nfrom . import sibling\nimport numpy.linalg\n\ndef f():\n    import yaml\n")
    assert undeclared([script], {"numpy", "pyyaml"}, set()) == []
    assert undeclared([script], {"numpy"}, set()) == [f"{script}:6: import yaml needs distribution PyYAML, "
                                                      "not declared"]
