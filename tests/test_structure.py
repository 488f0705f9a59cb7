"""The package's shape: no import cycles between its files (lazy imports included), nothing
imports the command line, `python -m hasten` works."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import hasten

ROOT = Path(hasten.__file__).parent


def module_name(path: Path) -> str:
    parts = ("hasten",) + path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in ROOT.rglob("*.py")}


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """Modules of the package that `name` imports anywhere in its file (functions included),
    with the packages whose `__init__` such an import runs (except the importer's own)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        targets = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[:len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        for target in targets:
            if target in known:
                found.add(target)
    ancestors = {".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 1)}
    for target in list(found):  # importing a.b.c runs a/__init__ and a/b/__init__ too
        parts = target.split(".")
        found |= {".".join(parts[:i]) for i in range(1, len(parts))} - ancestors
    return found - {name} - ancestors


def import_graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: imports_of(name, path, set(mods)) for name, path in mods.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    sys.setrecursionlimit(10_000)
    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_cycle_finder_finds_a_cycle():  # the check itself can fail
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_relative_and_lazy_imports_are_seen():
    graph = import_graph()
    assert "hasten.decoding.engine" in graph["hasten.decoding.generate"]  # from .engine import
    assert "hasten.api" in graph["hasten.commands.common"]  # a lazy import inside a function


def test_no_import_cycles_between_files():
    assert cycles(import_graph()) == []


def test_nothing_imports_the_command_line():
    offenders = {name: sorted(t for t in targets if t.startswith("hasten.commands"))
                 for name, targets in import_graph().items()
                 if not name.startswith("hasten.commands") and name != "hasten.__main__"}
    assert {k: v for k, v in offenders.items() if v} == {}


def test_python_dash_m_hasten():
    done = subprocess.run([sys.executable, "-m", "hasten", "--help"], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    for command in ("generate", "bench", "serve", "datastore", "distill", "train"):
        assert command in done.stdout
    done = subprocess.run([sys.executable, "-m", "hasten", "generate", "--draft", "nope", "hi"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "invalid choice: 'nope'" in done.stderr
