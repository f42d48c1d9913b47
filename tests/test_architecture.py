"""The packages of src/shardwise import one way: each from itself and the ones before it in ``ORDER``, with no cycle.

Run as a script to print the package graph: ``python tests/test_architecture.py``.
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).parent.parent / "src" / "shardwise"

# Lowest first. A unit is a package below shardwise or a top-level module; one entry may hold several units that
# sit at the same level (the helpers, which import nothing of shardwise but each other).
ORDER = [
    ("words", "untrusted", "progress"),  # counts in messages, JSON from strangers, progress lines
    ("plan",),  # what each rank holds: specs, boxes, the mesh, rank plans, flat blocks, series declarations
    ("dist",),  # how ranks talk: process groups, shared memory, collectives, block transfers
    ("providers",),  # how a rank gets a block's weights: its buffers; resident, ZeRO-3, series
    ("model",),  # the computation: layers, forward and generate, tokenizer, initialisation
    ("io",),  # files and a rank's weights: read, load, save sharded, export, the checked write, GGUF
    ("launch",),  # starting ranks, and removing what killed writes left (io's journal)
    ("train",),  # step, loss, gradients, AdamW, data, training checkpoints, the run
    ("bench",),  # the benchmarks
    ("cli",),  # the command line
]
LEVEL = {unit: level for level, units in enumerate(ORDER) for unit in units}
FACADE_NAMES = {"__version__"}  # what may be imported from shardwise/__init__.py, the public facade


def module_name(path: Path) -> str:
    """``shardwise.io.reader`` for src/shardwise/io/reader.py; packages by their ``__init__``."""
    parts = ("shardwise", *path.relative_to(SRC).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(SRC.rglob("*.py"))}


def unit(module: str) -> str | None:
    """The package or top-level module that ``module`` belongs to; None for shardwise itself."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def imports(name: str, path: Path, known: set[str]) -> list[tuple[int, str, str]]:
    """(line, imported module, name) for every import of shardwise in the file, wherever it stands (a function's
    lazy import and a TYPE_CHECKING one count as much as any)."""
    is_package = path.name == "__init__.py"
    here = name.split(".") if is_package else name.split(".")[:-1]
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name, "") for a in node.names if a.name.split(".")[0] == "shardwise"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here[: len(here) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "shardwise":
                continue
            for a in node.names:
                sub = f"{target}.{a.name}"
                out.append((node.lineno, sub, "") if sub in known else (node.lineno, target, a.name))
    return out


def package_edges() -> tuple[dict[tuple[str, str], list[str]], list[str]]:
    """Edges between units, each with the imports that make it, and every import that breaks a rule on its own."""
    mods = modules()
    edges: dict[tuple[str, str], list[str]] = {}
    problems = []
    for name, path in mods.items():
        source = unit(name)
        if source is None:
            continue  # shardwise/__init__.py: the public API, which may gather from anywhere
        if source not in LEVEL:
            problems.append(f"{name}: {source} has no place in ORDER (tests/test_architecture.py)")
            continue
        for line, target, what in imports(name, path, set(mods)):
            where = f"{path.relative_to(SRC.parent)}:{line} imports {target}{'.' + what if what else ''}"
            if target not in mods:
                problems.append(f"{where}: no such module")
                continue
            dest = unit(target)
            if dest is None:
                if what not in FACADE_NAMES:
                    problems.append(f"{where}: import it from the module that defines it, not from the facade")
                continue
            if dest != source:
                edges.setdefault((source, dest), []).append(where)
    return edges, problems


def cycles(edges: dict[tuple[str, str], list[str]]) -> list[list[str]]:
    """The strongly connected components of more than one unit (Tarjan)."""
    graph: dict[str, list[str]] = {}
    for a, b in edges:
        graph.setdefault(a, []).append(b)
        graph.setdefault(b, [])
    index, low, stack, on, found = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_every_module_has_a_place_and_imports_only_what_exists():
    _, problems = package_edges()
    assert not problems, "\n".join(problems)


def shortest_cycle(component: list[str], edges: dict[tuple[str, str], list[str]]) -> list[str]:
    """The shortest cycle through the units of ``component``, as [a, b, ..., a]."""
    best: list[str] = []
    for start in component:
        paths, seen = [[start]], {start}
        while paths and not (best and len(paths[0]) >= len(best)):
            path = paths.pop(0)
            for a, b in edges:
                if a == path[-1] and b in component:
                    if b == start:
                        best = path + [b] if not best or len(path) + 1 < len(best) else best
                    elif b not in seen:
                        seen.add(b)
                        paths.append(path + [b])
    return best


def test_no_import_cycle_between_packages():
    edges, _ = package_edges()
    found = [shortest_cycle(c, edges) for c in cycles(edges)]
    assert not found, "\n".join(
        "cycle " + " ".join(f"{a} -> {b} ({edges[a, b][0]}{' ...' if len(edges[a, b]) > 1 else ''});"
                            for a, b in zip(c, c[1:]))
        for c in found)


def test_packages_import_only_their_own_level_or_lower():
    edges, _ = package_edges()
    upward = [w for (a, b), ws in sorted(edges.items()) if LEVEL[b] > LEVEL[a] for w in ws]
    assert not upward, "imports against ORDER (tests/test_architecture.py):\n" + "\n".join(upward)


def test_the_checks_catch_a_cycle_and_an_upward_import():
    edges = {("plan", "io"): ["x"], ("io", "plan"): ["y"]}
    assert cycles(edges) == [["io", "plan"]]
    assert shortest_cycle(["io", "plan"], edges) == ["io", "plan", "io"]
    assert LEVEL["io"] > LEVEL["plan"]  # so plan -> io is refused as upward too


if __name__ == "__main__":
    edges, problems = package_edges()
    for units in ORDER:
        for u in units:
            deps = sorted({b for a, b in edges if a == u}, key=lambda b: (LEVEL[b], b))
            print(f"{u:>10} -> {', '.join(deps) or '-'}")
    print("\n".join(problems) or "no misplaced import", "| cycles:", cycles(edges) or "none")
