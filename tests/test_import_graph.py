"""Import structure: no import cycle among the project's packages, and the engine never names its users.

The graph is read with ``ast`` from the source files, so it holds every ``import`` and ``from ... import``
statement wherever it stands: at module level, inside functions (the lazy imports) and under
``if TYPE_CHECKING:``. Imports spelled as strings (``importlib.import_module``, the registries'
``"module:attribute"`` built-ins, entry points) are not edges: they are resolved only when a name is used.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("mgt", "actors", "pipeline", "jobs", "shapes")
ENGINE = ("mgt", "actors", "pipeline", "jobs")  # what must work without the shapes benchmark
# The shapes benchmark as code or prose spells it: the package and its paths (shapes.scenes, shapes/assets,
# shapes_scorer), its registered names (shapes-meissonic, the scorer 'shapes', train-shapes) and its modules.
SHAPES_NAMES = re.compile(r"\bshapes[.:/_-]\w|\w[-_]shapes\b|[`'\"]shapes[`'\"]|--scorer shapes|\bscene_detector\b"
                          r"|\bscenes\.py\b|\b(?:from|import) shapes\b|\bshapes (?:benchmark|scorer|model|domain|grammar|package)\b", re.I)


def modules(packages: tuple[str, ...]) -> dict[str, Path]:
    """Dotted module name -> source file, for every ``.py`` file under ``packages``."""
    found = {}
    for package in packages:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imported_modules(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The project modules that ``name`` (source ``path``) imports, as the longest known dotted prefix."""

    def project_module(dotted: str) -> str | None:
        while dotted and dotted not in known:
            dotted = dotted.rpartition(".")[0]
        return dotted or None

    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets: set[str | None] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets.update(project_module(alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import: climb from this module's package
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            # `from pkg import mod` imports the module pkg.mod; `from mod import name` imports mod
            targets.update(project_module(f"{base}.{alias.name}") if f"{base}.{alias.name}" in known
                           else project_module(base) for alias in node.names)
    return {target for target in targets if target and target != name}


def import_graph(packages: tuple[str, ...]) -> dict[str, set[str]]:
    known = modules(packages)
    return {name: imported_modules(name, path, known) for name, path in known.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (as a path ``a -> b -> ... -> a``) per strongly connected component that has one."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    components: list[list[str]] = []

    def visit(node: str) -> None:  # Tarjan's algorithm
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in sorted(graph[node]):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(component)

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return [_cycle_path(graph, set(component)) for component in components]


def _cycle_path(graph: dict[str, set[str]], component: set[str]) -> list[str]:
    """The shortest cycle through the component's first module (breadth-first inside the component)."""
    start = min(component)
    parents: dict[str, str | None] = {start: None}
    queue = [start]
    for node in queue:
        for target in sorted(graph[node] & component):
            if target == start:
                path = [node]
                while parents[path[-1]] is not None:
                    path.append(parents[path[-1]])
                return [*reversed(path), start]
            if target not in parents:
                parents[target] = node
                queue.append(target)
    raise AssertionError(f"{sorted(component)} is not strongly connected")


def test_no_import_cycles():
    found = cycles(import_graph(PACKAGES))
    assert not found, "import cycles (module- or function-level):\n" + "\n".join(" -> ".join(c) for c in found)


def test_the_cycle_finder_finds_cycles():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": {"e2"}, "e2": set()}
    assert cycles(graph) == [["a", "b", "c", "a"]]


def test_function_level_imports_are_edges():
    graph = import_graph(PACKAGES)
    assert "mgt.hub.registry" in graph["mgt.hub.loading"]  # module level
    assert "shapes.scorer" in graph["shapes.registration"]  # inside build_shapes_scorer


def test_the_engine_neither_imports_nor_names_the_shapes_benchmark():
    problems = []
    graph = import_graph(PACKAGES)
    for name, targets in graph.items():
        if name.split(".")[0] in ENGINE:
            problems += [f"{name} imports {t}" for t in sorted(targets) if t.split(".")[0] == "shapes"]
    for package in ENGINE:
        for path in sorted((ROOT / package).rglob("*")):
            if path.is_file() and path.suffix in (".py", ".json", ".yaml", ".md", ".txt"):
                for number, line in enumerate(path.read_text().splitlines(), 1):
                    if SHAPES_NAMES.search(line):
                        problems.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not problems, "the engine must find the shapes benchmark only through entry points:\n" + "\n".join(problems)


def test_the_name_pattern_catches_the_benchmark():
    for text in ("from shapes import scenes", "shapes.registration:shapes_meissonic", "model='shapes-meissonic'",
                 "build_scorer('shapes')", "--scorer shapes", "maskray train-shapes", "actors/shapes_scorer.py",
                 "the shapes scorer"):
        assert SHAPES_NAMES.search(text), text
    for text in ("tensor shapes.", "shapes = [f'{k}: ...']", "if missing or shapes:", "mask shapes differ"):
        assert not SHAPES_NAMES.search(text), text
