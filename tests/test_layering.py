"""The package's rooms depend on each other one way only (docs/architecture.md).

The import graph is built statically (ast over every module of ``sipdrill``):
imports at module level and inside functions count; imports under ``if
TYPE_CHECKING:`` do not (they never run). A room is a subpackage
(``sipdrill.pool``) or a top-level module (``sipdrill.addresses``).
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path

import pytest

import sipdrill

PACKAGE = Path(sipdrill.__file__).resolve().parent
ROOMS = ("sip", "dns", "clients", "pool", "backup", "cms", "admin", "control", "orchestrator")
#: Rooms that run inside the lab's processes: the orchestrator drives them, never the reverse.
NOT_ORCHESTRATOR = ("pool", "backup", "cms", "control")
#: The drawing in docs/architecture.md: what each room may import (the rooms
#: drawn below it). A new room must be added here, and to the drawing.
FOUNDATION = {"addresses", "topology", "topology_cli", "yamlfile", "errors"}
MAY_IMPORT: dict[str, set[str]] = {
    "__main__": {"cli"},
    "cli": {"orchestrator", "admin", "backup", "pool", "cms", "clients", "dns", "sip", "control"}
    | FOUNDATION,
    "orchestrator": {"admin", "backup", "pool", "cms", "clients", "dns", "sip", "control"}
    | FOUNDATION,
    "admin": {"backup", "pool", "cms", "clients", "dns", "sip", "control"} | FOUNDATION,
    "backup": {"pool", "cms", "clients", "dns", "sip", "control"} | FOUNDATION,
    "pool": {"cms", "sip", "control"} | FOUNDATION,
    "cms": {"sip", "control"} | FOUNDATION,
    "clients": {"sip", "control"} | FOUNDATION,
    "dns": {"control"} | FOUNDATION,
    "sip": {"control"} | FOUNDATION,
    "control": FOUNDATION,
    **{module: FOUNDATION for module in FOUNDATION},
}


@dataclass(frozen=True)
class Edge:
    source: str  # room
    target: str  # room
    where: str  # file:line


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _room(module: str) -> str | None:
    """``pool`` for ``sipdrill.pool.service``; None for ``sipdrill`` itself."""
    parts = module.split(".")
    return parts[1] if parts[0] == "sipdrill" and len(parts) > 1 else None


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


class _Imports(ast.NodeVisitor):
    def __init__(self, module: str, is_package: bool) -> None:
        self.package = module if is_package else module.rpartition(".")[0]
        self.found: list[tuple[str, int]] = []
        self.dynamic: list[int] = []

    def visit_If(self, node: ast.If) -> None:
        if _is_type_checking(node.test):
            for child in node.orelse:
                self.visit(child)
        else:
            self.generic_visit(node)

    def visit_Import(self, node: ast.Import) -> None:
        self.found.extend((alias.name, node.lineno) for alias in node.names)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.level:
            base = self.package.split(".")
            base = base[: len(base) - (node.level - 1)]
            module = ".".join([*base, node.module] if node.module else base)
        else:
            module = node.module or ""
        # `from sipdrill import addresses` imports the module sipdrill.addresses.
        self.found.append((module, node.lineno))
        self.found.extend((f"{module}.{alias.name}", node.lineno) for alias in node.names)

    def visit_Call(self, node: ast.Call) -> None:
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
        if name in ("import_module", "__import__"):
            self.dynamic.append(node.lineno)
        self.generic_visit(node)


def _modules() -> Iterator[tuple[str, Path]]:
    for path in sorted(PACKAGE.rglob("*.py")):
        yield _module_name(path), path


def edges() -> tuple[list[Edge], list[str]]:
    """The imports from one room to another, and the dynamic imports (file:line)."""
    modules = dict(_modules())
    out: list[Edge] = []
    dynamic: list[str] = []
    for module, path in modules.items():
        source = _room(module)
        if source is None:
            continue
        visitor = _Imports(module, path.name == "__init__.py")
        visitor.visit(ast.parse(path.read_text(), str(path)))
        where = path.relative_to(PACKAGE.parent)
        dynamic.extend(f"{where}:{line}" for line in visitor.dynamic)
        for imported, line in visitor.found:
            if imported not in modules:
                continue  # another package, or a name imported from a module
            target = _room(imported)
            edge = Edge(source, target or "", f"{where}:{line}")
            if target is not None and target != source and edge not in out:
                out.append(edge)
    return out, dynamic


def room_graph(found: list[Edge]) -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for e in found:
        graph.setdefault(e.source, set()).add(e.target)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle of rooms (first room repeated at the end), or None."""
    state: dict[str, int] = {}  # 1 on the path, 2 done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt):], nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


@pytest.fixture(scope="module")
def found() -> list[Edge]:
    return edges()[0]


def _where(found: list[Edge], source: str, target: str) -> list[str]:
    return [e.where for e in found if (e.source, e.target) == (source, target)]


def test_the_graph_sees_every_room(found: list[Edge]) -> None:
    rooms = {e.source for e in found} | {e.target for e in found}
    assert set(ROOMS) <= rooms
    # A known edge, so an empty graph cannot pass the tests below.
    assert _where(found, "backup", "pool")


def test_no_dynamic_imports() -> None:
    """importlib would hide edges from this test (and from readers)."""
    assert edges()[1] == []


def test_no_cycle_between_rooms(found: list[Edge]) -> None:
    cycle = find_cycle(room_graph(found)) or []
    steps = [f"{a} -> {b} at {', '.join(_where(found, a, b))}" for a, b in pairwise(cycle)]
    assert not cycle, "rooms import each other in a circle: " + "; ".join(steps)


@pytest.mark.parametrize("room", NOT_ORCHESTRATOR)
def test_rooms_never_import_the_orchestrator(found: list[Edge], room: str) -> None:
    assert not _where(found, room, "orchestrator")


def test_rooms_import_only_what_the_drawing_puts_below_them(found: list[Edge]) -> None:
    bad = [e for e in found if e.target not in MAY_IMPORT.get(e.source, set())]
    assert not bad, [f"{e.source} -> {e.target} at {e.where}" for e in bad]


def test_control_imports_no_room(found: list[Edge]) -> None:
    bad = [e for e in found if e.source == "control" and e.target in ROOMS]
    assert not bad, [f"{e.target} at {e.where}" for e in bad]


def test_the_cycle_finder_finds_cycles() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
