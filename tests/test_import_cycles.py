"""Forge's modules import one another without a cycle, counting imports made inside
functions (a cycle hidden in a lazy import is still one: neither module can be read alone)."""

from __future__ import annotations

import ast
from pathlib import Path

FORGE = Path(__file__).resolve().parent.parent / "forge"

KNOWN: list[set[str]] = []  # cycles left for their owner (none now)


def module_imports(package: Path = FORGE) -> dict[str, set[str]]:
    """Each module of `package` and the modules of it that it imports anywhere in its file. `from
    forge.x import y` counts as importing `forge.x.y` when that is a module, else `forge.x`
    (a package's own `__init__` is left out: importing a submodule runs it either way)."""
    names = {}
    for path in package.rglob("*.py"):
        parts = path.relative_to(package.parent).with_suffix("").parts
        names[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    packages = {name for name, path in names.items() if path.name == "__init__.py"}
    graph: dict[str, set[str]] = {}
    for name, path in names.items():
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                for alias in node.names:
                    found.add(
                        f"{node.module}.{alias.name}"
                        if f"{node.module}.{alias.name}" in names
                        else node.module
                    )
        graph[name] = {
            target for target in found if target in names and target not in packages and target != name
        }
    return graph


def cycles(graph: dict[str, set[str]]) -> list[set[str]]:
    """The groups of modules that reach one another (strongly connected, more than one)."""
    reach = {name: _reachable(graph, name) for name in graph}
    groups: list[set[str]] = []
    for name in sorted(graph):
        group = {other for other in reach[name] if name in reach[other]}
        if len(group) > 1 and group not in groups:
            groups.append(group)
    return groups


def _reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen: set[str] = set()
    todo = list(graph[start])
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo.extend(graph[name])
    return seen


def test_no_forge_module_is_in_an_import_cycle_lazy_imports_included():
    found = cycles(module_imports())
    assert [group for group in found if group not in KNOWN] == []


def test_the_finder_sees_a_cycle_made_by_an_import_inside_a_function(tmp_path):
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "loop.py").write_text("from pkg.tool import Tool\n")
    (package / "tool.py").write_text("def play():\n    from pkg.loop import run\n    return run\n")
    (package / "alone.py").write_text("import pkg.tool\n")
    assert cycles(module_imports(package)) == [{"pkg.loop", "pkg.tool"}]
