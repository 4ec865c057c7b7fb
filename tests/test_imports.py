"""The package's own import graph: the library never imports its command line, and has no cycle.

Every module under `coreg_ray/` is parsed (not imported) with `ast`; an edge A -> B is any
`import`/`from ... import` of B anywhere in A, at module level or inside a function (a lazy import
still ties the two modules together). `from pkg import name` counts as an import of `pkg.name`
when that is a module, else of `pkg`. Importing `pkg.mod` also runs `pkg/__init__.py`, but that
implicit edge is left out: a package's `__init__` re-exporting its modules is not a cycle.
"""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = "coreg_ray"
ROOT = Path(__file__).resolve().parent.parent / PACKAGE
CLI = f"{PACKAGE}.cli"

# Known cycles, each written as the sorted modules of its strongly connected component: a new
# cycle, or a module joining a known one, fails the test; breaking one fails it too, until the
# entry is removed. None is left: the last one (`baselines/__init__.py` holding the baselines'
# registry and importing `pico`/`pll`, which imported `register` back) went when the registry
# moved into a module of its own, `coreg_ray.method_registry` (issue 13, item 4).
KNOWN_CYCLES: set[tuple[str, ...]] = set()


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The `coreg_ray` modules that module `name` imports (anywhere in the file)."""
    is_pkg = path.name == "__init__.py"
    here = name if is_pkg else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from . import x / from ..pkg import y
                base = here.split(".")
                base = base[:len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            targets = [f"{mod}.{a.name}" if f"{mod}.{a.name}" in known else mod
                       for a in node.names]
        else:
            continue
        for t in targets:
            if t == PACKAGE or t.startswith(PACKAGE + "."):
                while t not in known and "." in t:  # `import coreg_ray.x.y` -> nearest module
                    t = t.rpartition(".")[0]
                if t != name:
                    out.add(t)
    return out


def import_graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    return {name: imports_of(name, path, known) for name, path in mods.items()}


def cycles(graph: dict[str, set[str]]) -> set[tuple[str, ...]]:
    """The strongly connected components of more than one module (Tarjan), each as a sorted
    tuple: every import cycle lies inside exactly one of them."""
    index, low, on, stack, out = {}, {}, set(), [], set()
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
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
                out.add(tuple(sorted(comp)))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_graph_is_read():
    g = import_graph()
    assert CLI in g and f"{PACKAGE}.runs" in g
    assert f"{PACKAGE}.runs" in g[CLI]  # the CLI runs through the run layer
    assert f"{PACKAGE}.coreg.trainer" in g[f"{PACKAGE}.runs"]  # a lazy import counts


def test_the_library_never_imports_the_cli():
    g = import_graph()
    offenders = sorted(m for m, deps in g.items() if CLI in deps and m != CLI)
    assert offenders == [], f"{', '.join(offenders)} import {CLI} (use coreg_ray.runs / outputs)"


def test_no_import_cycle_inside_the_package():
    found = cycles(import_graph())
    new = sorted(found - KNOWN_CYCLES)
    gone = sorted(KNOWN_CYCLES - found)
    assert not new, "import cycle(s): " + "; ".join(" <-> ".join(c) for c in new)
    assert not gone, ("known cycle(s) no longer there, remove them from KNOWN_CYCLES: "
                      + "; ".join(" <-> ".join(c) for c in gone))


def test_cycle_finder_finds_a_lazy_cycle():
    g = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(g) == {("a", "b", "c")}
