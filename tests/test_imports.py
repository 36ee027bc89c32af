"""Imports run one way (DESIGN.md): geometry, decode, errors, outputs and stores at the bottom;
pipeline, trainer and segment above them; experiments above those; cli on top.

Each room is imported alone in a fresh interpreter and what it pulled in is checked; and the
package's import graph, read from the source (function-local imports counted), has no cycle
between modules nor between rooms."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "zeroseg"
BOTTOM = {"geometry", "decode", "errors", "outputs"}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def room_of(module: str) -> str:
    """zeroseg.stores.features -> stores; zeroseg.geometry -> geometry; zeroseg -> zeroseg."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


SOURCES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def import_alone(room: str) -> subprocess.Popen:
    """A fresh interpreter importing every module of `room`; it prints the zeroseg modules then loaded."""
    names = [m for m in SOURCES if room_of(m) == room and m != "zeroseg.__main__"]
    code = (
        f"import importlib, json, sys\nsys.path[:0] = [{str(ROOT)!r}]\n"
        f"for name in {names!r}:\n    importlib.import_module(name)\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.startswith('zeroseg.'))))"
    )
    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)


# room -> the rooms it may pull in when imported (itself aside)
ALLOWED = {
    "geometry": set(),
    "decode": {"geometry", "errors"},
    "stores": BOTTOM,
    "pipeline": BOTTOM | {"stores"},
    # the trainer reaches the teacher (pipeline) only for --targets online, inside that code path
    "trainer": BOTTOM | {"stores"},
    "segment": BOTTOM | {"stores", "trainer"},
    "experiments": BOTTOM | {"stores", "pipeline", "trainer", "segment"},
    # each verb imports its room when called; ui (progress, summaries) sits beside it; the recipe
    # names for the options' help come from trainer.recipes (json files, no torch)
    "cli": {"errors", "ui", "trainer"},
}


@pytest.fixture(scope="module")
def pulled_in() -> dict[str, set[str]]:
    """room -> the rooms in sys.modules after importing it alone (all rooms at once: each pays
    for torch's import, and they wait on it side by side)."""
    procs = {room: import_alone(room) for room in ALLOWED}
    pulled = {}
    for room, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
        pulled[room] = {room_of(m) for m in json.loads(out.splitlines()[-1])}
    return pulled


@pytest.mark.parametrize("room", list(ALLOWED))
def test_a_room_imported_alone_pulls_in_only_rooms_below_it(room, pulled_in):
    extra = pulled_in[room] - {room} - ALLOWED[room]
    assert not extra, f"importing zeroseg.{room} pulled in {sorted(extra)}"


def imports_of(module: str, path: Path) -> set[str]:
    """The zeroseg modules `module` imports anywhere in its source, function bodies included."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the module's own package up
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            # `from zeroseg.segment import render` imports the module zeroseg.segment.render
            found |= {f"{base}.{a.name}" if f"{base}.{a.name}" in SOURCES else base for a in node.names}
    return {m for m in found if m in SOURCES and m != module}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle of `graph` as a path [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = 2
        path.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_import_graph_has_no_cycle():
    modules = {m: imports_of(m, p) for m, p in SOURCES.items()}
    assert find_cycle(modules) is None, " -> ".join(find_cycle(modules))
    rooms: dict[str, set[str]] = {}
    for module, imported in modules.items():
        rooms.setdefault(room_of(module), set()).update(room_of(m) for m in imported if room_of(m) != room_of(module))
    assert find_cycle(rooms) is None, "rooms import each other: " + " -> ".join(find_cycle(rooms))
    # what may be imported only inside a function is still one way: the trainer reaches the
    # teacher, never the other way round, and no room below experiments reaches it
    assert "trainer" not in rooms["pipeline"] and "segment" not in rooms["trainer"]
    assert not any("experiments" in rooms[r] for r in ("stores", "pipeline", "trainer", "segment"))


def test_the_cycle_finder_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None
