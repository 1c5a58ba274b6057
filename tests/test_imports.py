"""The package's import graph has no cycle, and test modules share helpers only through
conftest.py, tests/helpers.py and the support modules, never by importing each other."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SUPPORT = {"conftest", "helpers", "fakes", "processes", "__init__"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported(path: Path, package: str, modules: frozenset[str] = frozenset()) -> set[str]:
    """Every module of ``package`` that ``path`` imports, at any level of the file (imports
    inside functions or under TYPE_CHECKING still make a loop a reader has to follow).

    ``from pkg import name`` is an edge to the submodule ``pkg.name`` when there is one (as
    import tools count it: a package's ``__init__`` importing its own modules, which import
    each other through the package, is no loop), else to ``pkg`` itself."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    here = module_name(path)
    is_package = path.name == "__init__.py"
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here.split(".")
                base = base[: len(base) - node.level + (1 if is_package else 0)]
                source = ".".join([*base, node.module] if node.module else base)
            else:
                source = node.module or ""
            for alias in node.names:
                submodule = f"{source}.{alias.name}"
                names.add(submodule if submodule in modules else source)
    return {name for name in names if name == package or name.startswith(package + ".")}


def graph(package: str) -> dict[str, set[str]]:
    files = sorted((REPO / package).rglob("*.py"))
    modules = {module_name(path): path for path in files}
    edges: dict[str, set[str]] = {}
    for name, path in modules.items():
        targets = {t for t in imported(path, package, frozenset(modules)) if t in modules}
        edges[name] = targets - {name}
    return edges


def cycle_in(edges: dict[str, set[str]]) -> list[str] | None:
    """One cycle as a path of module names, or None: depth-first search with colours."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for target in sorted(edges.get(node, ())):
            if state.get(target) == 1:
                return [*path[path.index(target) :], target]
            if target not in state and (found := visit(target)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_cycle_finder_finds_a_planted_cycle() -> None:
    assert cycle_in({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert cycle_in({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_the_proxy_package_has_no_import_cycle() -> None:
    edges = graph("proxy")
    assert edges.get("proxy.cli"), "the graph found no imports at all"
    cycle = cycle_in(edges)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_test_modules_never_import_each_other() -> None:
    offenders = []
    for path in sorted((REPO / "tests").rglob("test_*.py")):
        for target in imported(path, "tests"):
            if target.rsplit(".", 1)[-1].startswith("test_"):
                offenders.append(f"{module_name(path)} imports {target}")
    assert offenders == []
