"""The package's import graph has no cycles (#12): core <-> attempts, guards/base <->
guards/build, report <-> report_html <-> report_plots were one object cut by size.

Every import counts, at module level, under `if TYPE_CHECKING:` and inside functions: a
lazy import that closes a cycle is still two modules that need each other.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PKG = ROOT / "supervisor"


def _modules() -> dict[str, Path]:
    out = {}
    for p in PKG.rglob("*.py"):
        parts = p.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = p
    return out


def _resolve(name: str, mods: dict[str, Path]) -> str | None:
    while name and name not in mods:
        name = name.rpartition(".")[0]
    return name or None


def import_graph() -> dict[str, set[str]]:
    """module -> the supervisor modules it imports (a package's __init__ only when named)."""
    mods = _modules()
    graph: dict[str, set[str]] = {}
    for name, path in mods.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(up + ([node.module] if node.module else []))
                # `from pkg import mod` imports the module; `from mod import name` the module
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
            else:
                continue
            deps |= {r for t in targets if t.startswith("supervisor") and (r := _resolve(t, mods))}
        deps.discard(name)
        graph[name] = deps
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_import_graph_has_no_cycles() -> None:
    graph = import_graph()
    assert len(graph) > 50 and "supervisor.daemon.core" in graph["supervisor.cli.commands"]
    assert cycles(graph) == []


def test_the_cycle_finder_finds_one() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_guards_import_neither_the_core_nor_its_clients() -> None:
    """Guards are pure: the window is built on the core's side (daemon/guard_window.py)."""
    graph = import_graph()
    for mod, deps in graph.items():
        if mod.startswith("supervisor.guards"):
            bad = {d for d in deps if d.startswith(("supervisor.daemon", "supervisor.control",
                                                     "supervisor.tui", "supervisor.cli"))}
            assert not bad, f"{mod} imports {bad}"


def test_the_core_parts_do_not_import_the_core() -> None:
    """trainer_events, attempts and actions get a RunIO, never the Supervisor."""
    graph = import_graph()
    for part in ("trainer_events", "attempts", "actions", "guard_window", "runio"):
        assert "supervisor.daemon.core" not in graph[f"supervisor.daemon.{part}"], part


