"""numlm's import graph has no cycle, the models never import decoding, and no module is shadowed
by a function of the same name."""
import ast
import importlib
import types
from pathlib import Path

import numlm

ROOT = Path(numlm.__file__).parent


def _module_name(path):
    rel = path.relative_to(ROOT.parent).with_suffix("")
    parts = list(rel.parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph():
    """{module: set of numlm modules it imports}, from the source (relative and absolute imports)."""
    modules = {_module_name(p): p for p in ROOT.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                targets = [base] + [f"{base}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            deps.update(t for t in targets if t in modules and t != name)
        graph[name] = deps
    return graph


def test_no_import_cycle():
    graph = import_graph()
    # a package's __init__ re-exports its children; the edges that matter run between modules
    edges = {m: {d for d in ds if not m.startswith(d + ".") and not (d.startswith(m + ".") and
                                                                    m.count(".") < d.count("."))}
             for m, ds in graph.items()}
    seen, stack, cycles = set(), [], []

    def visit(m):
        if m in stack:
            cycles.append(stack[stack.index(m):] + [m])
            return
        if m in seen:
            return
        seen.add(m)
        stack.append(m)
        for d in sorted(edges[m]):
            visit(d)
        stack.pop()

    for m in sorted(edges):
        visit(m)
    assert cycles == []


def test_models_never_import_decoding():
    graph = import_graph()
    offenders = {m: sorted(d for d in ds if d.startswith("numlm.decoding") or d.startswith("numlm.inference"))
                 for m, ds in graph.items() if m.startswith("numlm.models") or m.startswith("numlm.nn")}
    assert {m: d for m, d in offenders.items() if d} == {}


def test_no_module_shadowed_by_a_function():
    assert isinstance(importlib.import_module("numlm.decoding"), types.ModuleType)
    assert numlm.generate is importlib.import_module("numlm.decoding").generate
    assert not (ROOT / "generate.py").exists() and not (ROOT / "generate").exists()
    assert numlm.gradcheck is importlib.import_module("numlm.gradchecking").gradcheck
    # no function numlm exports has the name of one of numlm's modules
    modules = {p.stem for p in ROOT.glob("*.py")} | {p.name for p in ROOT.iterdir() if p.is_dir()}
    functions = {n for n, v in vars(numlm).items() if isinstance(v, types.FunctionType)}
    assert functions & modules == set()
