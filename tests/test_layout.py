"""The shape of the code, checked: no import cycles (lazy imports inside functions count too), no private names
imported across modules, the runtime a leaf, and stages that never import the pipeline, the engine or the CLI."""
from __future__ import annotations

import ast
from pathlib import Path

from conftest import REPO

PKG = REPO / "toolchain"


def _module(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module(p): p for p in PKG.rglob("*.py")}


def _imports(mod: str) -> list[tuple[str, list[str]]]:
    """(imported toolchain module, names taken from it) for every import statement in the module, at any depth."""
    path = MODULES[mod]
    pkg = mod if path.name == "__init__.py" else mod.rsplit(".", 1)[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(a.name, []) for a in node.names if a.name.split(".")[0] == "toolchain"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "toolchain":
                continue
            names = [a.name for a in node.names]
            subs = [f"{target}.{n}" for n in names if f"{target}.{n}" in MODULES]  # `from pkg import module`
            out += [(s, []) for s in subs]
            rest = [n for n in names if f"{target}.{n}" not in MODULES]
            if rest or not subs:
                out.append((target, rest))
    return out


def _graph() -> dict[str, set[str]]:
    return {m: {t for t, _ in _imports(m) if t in MODULES and t != m} for m in MODULES}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
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

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles():
    assert _cycles(_graph()) == []


def test_no_private_names_imported_across_modules():
    bad = [(m, t, n) for m in MODULES for t, names in _imports(m) for n in names if n.startswith("_")]
    assert bad == []


def test_runtime_is_a_leaf():
    """What a device installs imports nothing from the rest of the toolchain."""
    bad = [(m, t) for m in MODULES if m.startswith("toolchain.runtime") for t in _graph()[m]
           if not t.startswith("toolchain.runtime")]
    assert bad == []


def test_stages_never_import_the_pipeline_engine_or_cli():
    above = ("toolchain.pipeline", "toolchain.engine", "toolchain.cli", "toolchain.auto", "toolchain.report")
    bad = [(m, t) for m in MODULES if m.startswith("toolchain.stages") for t in _graph()[m]
           if any(t == a or t.startswith(a + ".") for a in above)]
    assert bad == []


def test_the_layout_shows_the_pipeline():
    stages = {p.name for p in (PKG / "stages").iterdir() if not p.name.startswith("__")}
    assert {"finetune", "merge.py", "export", "reference.py", "quantize", "package.py"} <= stages
    assert {"schema.py", "catalog.py", "sources.py", "gguf_convert.py"} <= {p.name for p in (PKG / "config").iterdir()}
    assert (PKG / "engine.py").is_file() and (PKG / "pipeline.py").is_file()
