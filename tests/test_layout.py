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


def _spine_trace():
    path = ROOT.parent / "benchmarks" / "spine_trace.py"
    spec = importlib.util.spec_from_file_location("spine_trace", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_a_reader_walks_one_spine():
    """From input_ids to the loss and back (benchmarks/spine_trace.py, sys.settrace on the NumPy path):
    a forward with labels runs at most 30 numlm functions in at most 10 files, its backward() at most
    25 in at most 10 (they were 51 / 39 in 18 / 16 files for GPT-2); BERT's and RoBERTa's backward of
    the padded batch 28, running on the real tokens' rows (bert.py's real_rows, backward_on_rows and
    unpack_rows)."""
    for label, fns in _spine_trace().walks():
        files = {f for f, _ in fns}
        bert_rows = {("models/bert.py", "real_rows"), ("models/bert.py", "BertLayer.backward_on_rows")} <= set(fns)
        limit = 30 if "forward" in label else 28 if bert_rows else 25
        # RoBERTa reuses BERT's encoder rather than copying it: its spine is roberta.py and bert.py, one
        # model file more than a family of its own (DistilBERT, GPT, BERT)
        two_files = "Roberta" in label and {"models/roberta.py", "models/bert.py"} <= files
        assert len(fns) <= limit and len(files) <= 10 + two_files, (label, len(fns), sorted(files))
        assert any(f.startswith("models/") for f in files)  # the trace saw the model: it can fail


def test_no_monkeypatching_exec_or_runtime_classes():
    """No exec/eval, no assignment to a function's __code__, no class built with type(name, bases, dict),
    and no setattr on a module or a function anywhere in numlm."""
    bad = []
    for path in ROOT.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
                if node.func.id in ("exec", "eval") or (node.func.id == "type" and len(node.args) == 3):
                    bad.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.func.id}")
            if isinstance(node, ast.Attribute) and node.attr == "__code__" and isinstance(node.ctx, ast.Store):
                bad.append(f"{path.relative_to(ROOT)}:{node.lineno} __code__")
            if isinstance(node, ast.Assign) and any(isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name)
                                                    and t.value.id in ("PreTrainedModel", "Module") for t in node.targets):
                bad.append(f"{path.relative_to(ROOT)}:{node.lineno} a method attached from outside")
    assert bad == []


def test_no_function_over_60_lines():
    """A function a reader takes in at once: none in numlm runs over 60 lines (docstring included)."""
    long = []
    for path in ROOT.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 60:
                long.append(f"{path.relative_to(ROOT)}:{node.name} ({node.end_lineno - node.lineno + 1} lines)")
    assert long == []
