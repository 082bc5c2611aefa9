"""The package's rooms and their order: every import (at the top or inside a function) points down or
within its room, and no modules import each other in a circle. docs/ARCHITECTURE.md describes the rooms."""

import ast
from pathlib import Path

from conftest import ROOT

PACKAGE = ROOT / "distseg"
# bottom to top: a module may import its own room and the rooms below it
ROOMS = ["leaves", "shards", "data", "models", "inference", "runs", "training", "flows", "reporting", "bench",
         "commands", "entry"]
LEAVES = {"config", "labels", "errors", "files", "units", "urls", "processes", "run_files", "__init__"}
ENTRIES = {"cli", "launch", "train", "__main__"}


def room_of(module: str) -> str:
    """distseg.shards.shard -> shards; distseg.config -> leaves; distseg.cli -> entry."""
    parts = module.split(".")[1:] or ["__init__"]
    if len(parts) == 1:
        if parts[0] in LEAVES:
            return "leaves"
        if parts[0] in ENTRIES:
            return "entry"
    return parts[0]


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts = parts[:-1]
    return ".".join(parts)


def imports(path: Path) -> set[str]:
    """The distseg modules `path` imports (a `from package import name` counts the submodule if it is one)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("distseg")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("distseg"):
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                known = (ROOT / Path(*sub.split("."))).with_suffix(".py").is_file() or \
                    (ROOT / Path(*sub.split(".")) / "__init__.py").is_file()
                out.add(sub if known else node.module)
    return out


def graph() -> dict[str, set[str]]:
    return {module_name(p): imports(p) for p in PACKAGE.rglob("*.py")}


def test_every_module_is_in_a_known_room():
    strays = {m for m in graph() if room_of(m) not in ROOMS}
    assert not strays, f"modules outside the rooms {ROOMS}: {sorted(strays)}"


def test_imports_point_down_or_within_a_room():
    upward = []
    for mod, targets in graph().items():
        for t in targets:
            if ROOMS.index(room_of(t)) > ROOMS.index(room_of(mod)):
                upward.append(f"{mod} ({room_of(mod)}) imports {t} ({room_of(t)})")
    assert not upward, "\n".join(sorted(upward))


def test_no_import_circles():
    g = graph()
    state: dict[str, int] = {}
    stack: list[str] = []
    circles = []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for t in sorted(g.get(m, ())):
            if t not in g or t == m:
                continue
            if state.get(t) == 1:
                circles.append(" -> ".join(stack[stack.index(t):] + [t]))
            elif t not in state:
                visit(t)
        stack.pop()
        state[m] = 2

    for m in sorted(g):
        if m not in state:
            visit(m)
    assert not circles, "\n".join(circles)


def test_the_checks_can_fail():
    """The walker sees function-level imports and ranks rooms: an upward import is caught."""
    assert "distseg.flows.predict" in imports(PACKAGE / "commands" / "predict.py")
    assert ROOMS.index(room_of("distseg.training.loop")) > ROOMS.index(room_of("distseg.data.loader"))
    assert ROOMS.index(room_of("distseg.data.loader")) > ROOMS.index(room_of("distseg.shards.manifest"))
    assert room_of("distseg.config") == "leaves" and room_of("distseg.cli") == "entry"


def test_test_files_follow_the_rooms():
    """tests/test_<room>[_topic].py, or one of the whole-product checks: the README, Slurm, the install, this
    layout; or the suite's own machinery (test_suite_*.py)."""
    whole = {"readme", "slurm", "install", "layout", "suite"}
    strays = [p.name for p in (ROOT / "tests").glob("test_*.py")
              if p.stem[5:].split("_")[0] not in set(ROOMS) | whole]
    assert not strays, strays
