"""The package layout: no import cycles among cqil's modules, and no module longer than 500 lines."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "cqil"
MAX_LINES = 500
LONG_OK = "longer than 500 lines because"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    """The absolute module an ``ImportFrom`` names (relative imports resolved against ``module``)."""
    if not node.level:
        return node.module or ""
    base = module.split(".")
    if not is_package:
        base.pop()
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def cqil_imports(name: str, path: Path, *, module_level_only: bool) -> set[str]:
    """The cqil modules ``name`` imports (``from pkg import mod`` counts as importing ``pkg.mod``)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    nodes = tree.body if module_level_only else ast.walk(tree)
    found = set()
    for node in nodes:
        if isinstance(node, ast.If) and module_level_only:
            # `if TYPE_CHECKING:` imports never run; other module-level ifs do.
            test = node.test
            if isinstance(test, ast.Name) and test.id == "TYPE_CHECKING":
                continue
            nodes_in_if = node.body + node.orelse
        else:
            nodes_in_if = [node]
        for sub in nodes_in_if:
            if isinstance(sub, ast.Import):
                found.update(a.name for a in sub.names)
            elif isinstance(sub, ast.ImportFrom):
                target = resolve(name, path.name == "__init__.py", sub)
                found.add(target)
                found.update(f"{target}.{a.name}" for a in sub.names)
    return {m for m in found if m in MODULES and m != name}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_import_graph_covers_every_module():
    graph = {n: cqil_imports(n, p, module_level_only=False) for n, p in MODULES.items()}
    assert {"cqil.rewrite.group", "cqil.recovery.trainer", "cqil.cli"} <= set(graph)
    assert "cqil.rewrite.surgery" in graph["cqil.recovery.trainer"]


def test_no_import_cycle_among_module_level_imports():
    # Only module-level imports count: a function-level (lazy) import runs after every module has
    # loaded, so it may close a loop without breaking the import (cqil/__init__.py imports lazily
    # on purpose, and a few commands import heavy modules only when they run).
    graph = {n: cqil_imports(n, p, module_level_only=True) for n, p in MODULES.items()}
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_the_remote_code_group_module_imports_no_cqil_module():
    # An export ships cqil/rewrite/group.py verbatim as cqil_group.py: it must run without cqil.
    path = MODULES["cqil.rewrite.group"]
    assert cqil_imports("cqil.rewrite.group", path, module_level_only=False) == set()


def test_modules_are_at_most_500_lines_unless_they_say_why():
    too_long = []
    for name, path in MODULES.items():
        text = path.read_text(encoding="utf-8")
        if len(text.splitlines()) > MAX_LINES and LONG_OK not in (ast.get_docstring(ast.parse(text)) or ""):
            too_long.append(f"{name}: {len(text.splitlines())} lines")
    assert not too_long, too_long
