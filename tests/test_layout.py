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


def cqil_imports(name: str, path: Path) -> set[str]:
    """Every cqil module ``name`` imports, wherever the import stands: at module level, under
    ``if TYPE_CHECKING:``, or inside a function (``from pkg import mod`` counts as importing ``pkg.mod``)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            target = resolve(name, path.name == "__init__.py", node)
            found.add(target)
            found.update(f"{target}.{a.name}" for a in node.names)
    return {m for m in found if m in MODULES and m != name}


# The one exemption, named: cqil/__init__.py is the lazy public API. Its ``if TYPE_CHECKING:`` block
# mirrors ``_EXPORTS`` for type checkers and ``__getattr__`` imports a name's module on first use, so
# ``cqil`` -> ``cqil.rewrite.surgery`` never runs while the package loads, and a module that reads
# ``cqil.__version__`` must not count as a loop through it. Those edges, and only those, are left out.
LAZY_API = "cqil"


def lazy_api_targets() -> set[str]:
    """The modules cqil/__init__.py names in ``_EXPORTS`` (its lazy API)."""
    tree = ast.parse(MODULES[LAZY_API].read_text(encoding="utf-8"))
    for node in tree.body:
        target = (
            node.target
            if isinstance(node, ast.AnnAssign)
            else (node.targets[0] if isinstance(node, ast.Assign) else None)
        )
        if isinstance(target, ast.Name) and target.id == "_EXPORTS":
            return set(ast.literal_eval(node.value).values())
    return set()


def import_graph() -> dict[str, set[str]]:
    """Module -> the cqil modules it imports, every import counted, less the lazy API's edges."""
    graph = {n: cqil_imports(n, p) for n, p in MODULES.items()}
    graph[LAZY_API] -= lazy_api_targets()
    return graph


def import_circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected groups of two or more modules (each one circle of imports, however many
    loops it holds), by Tarjan's algorithm; sorted, each group sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    circles = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                circles.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return sorted(circles)


def test_the_import_graph_covers_every_module():
    graph = import_graph()
    assert {"cqil.rewrite.group", "cqil.recovery.trainer", "cqil.cli"} <= set(graph)
    assert "cqil.rewrite.surgery" in graph["cqil.recovery.student"]
    assert "cqil.recovery.student" in graph["cqil.recovery.trainer"]


def test_a_circle_is_found_whole():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set(), "e": {"e"}}
    assert import_circles(graph) == [["a", "b", "c"]]


def test_every_kind_of_import_is_counted(tmp_path):
    # Module level, `if TYPE_CHECKING:` and function level all make an edge.
    source = (
        "from typing import TYPE_CHECKING\n"
        "from cqil.errors import CqilError\n"
        "if TYPE_CHECKING:\n"
        "    from cqil.recovery.trainer import RecoveryTrainer\n"
        "def f():\n"
        "    from cqil.rewrite import surgery\n"
    )
    path = tmp_path / "probe.py"
    path.write_text(source)
    assert cqil_imports("cqil.probe", path) == {
        "cqil.errors",
        "cqil.recovery.trainer",
        "cqil.rewrite",
        "cqil.rewrite.surgery",
    }


def test_the_lazy_api_exemption_is_only_the_lazy_api():
    targets = lazy_api_targets()
    assert "cqil.rewrite.surgery" in targets and "cqil.recovery.trainer" not in targets
    # Every edge the exemption removes is a name of the lazy API, none other.
    assert import_graph()[LAZY_API] == cqil_imports(LAZY_API, MODULES[LAZY_API]) - targets


def test_no_import_cycle_counting_every_import():
    # TYPE_CHECKING and function-level imports count: a circle they close is still a circle a reader
    # has to hold in mind, and a part that cannot be imported without the object it serves.
    circles = import_circles(import_graph())
    assert not circles, "; ".join(", ".join(group) for group in circles)


def test_the_remote_code_group_module_imports_no_cqil_module():
    # An export ships cqil/rewrite/group.py verbatim as cqil_group.py: it must run without cqil.
    path = MODULES["cqil.rewrite.group"]
    assert cqil_imports("cqil.rewrite.group", path) == set()


def test_modules_are_at_most_500_lines_unless_they_say_why():
    too_long = []
    for name, path in MODULES.items():
        text = path.read_text(encoding="utf-8")
        if len(text.splitlines()) > MAX_LINES and LONG_OK not in (ast.get_docstring(ast.parse(text)) or ""):
            too_long.append(f"{name}: {len(text.splitlines())} lines")
    assert not too_long, too_long
