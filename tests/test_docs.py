"""The derivation pages (docs/derivations/) and the equation map (docs/EQUATIONS.md) stay true to the code.

- Every ```python block of a page runs, in order, in one namespace per page (so a page reads like a
  notebook); the blocks gradcheck the op the page derives, so a page cannot drift from the code.
- Every ```py block is an excerpt: its first line names `# path:function`, and every other line
  must be a line of that function's source (compared without indentation).
- Every `path:name` a page or the equation map cites names a function, class or method that exists
  (the file parsed with ast), and every `numlm/...py` file they name exists.
"""
import ast
import linecache
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DERIVATIONS = ROOT / "docs" / "derivations"
EQUATIONS = ROOT / "docs" / "EQUATIONS.md"
README = ROOT / "README.md"
PAGES = sorted(p for p in DERIVATIONS.glob("*.md") if p.name != "README.md")
EXPECTED = ["layernorm", "softmax_cross_entropy", "attention", "gelu", "embedding", "linear", "lora",
            "prefix_tuning", "adam", "gpt1_l3"]

FENCE = re.compile(r"^```(\w*)[ \t]*\n(.*?)^```[ \t]*$", re.M | re.S)
CITATION = re.compile(r"`((?:[\w.]+/)*\w+\.py):([A-Za-z_][\w.]*)")  # `path.py:name`, at a backtick
FILE = re.compile(r"`(numlm/[\w/]+\.py)\b")


def blocks(text, lang):
    return [code for tag, code in FENCE.findall(text) if tag == lang]


def resolve(path):
    """A cited path: as written from the repository root, or the one file under numlm/ ending in it."""
    if (ROOT / path).is_file():
        return ROOT / path
    hits = [p for p in (ROOT / "numlm").rglob("*.py") if p.as_posix().endswith("/" + path)]
    return hits[0] if len(hits) == 1 else None


def definition(path, dotted):
    """The ast node defining `dotted` (function, class, Class.method, or a module-level alias
    `name = other_function`) in the file at `path`, or None."""
    body = ast.parse(path.read_text()).body
    node = None
    for part in dotted.split("."):
        found = None
        for n in body:
            if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and n.name == part:
                found = n
            elif (isinstance(n, ast.Assign) and isinstance(n.value, ast.Name)
                  and any(isinstance(t, ast.Name) and t.id == part for t in n.targets)):
                found = n  # an alias: gelu_tanh_backward = gelu_backward
        if found is None:
            return None
        node, body = found, getattr(found, "body", [])
    return node


def citations(text):
    return CITATION.findall(text)


def missing_citations(text):
    bad = []
    for path, name in citations(text):
        file = resolve(path)
        if file is None:
            bad.append(f"{path} (no such file, or more than one under numlm/)")
        elif definition(file, name) is None:
            bad.append(f"{path}:{name} (no such function, class or method)")
    bad += [f"{p} (no such file)" for p in FILE.findall(text) if not (ROOT / p).is_file()]
    return bad


def excerpt_mismatches(code):
    """Lines of an excerpt block that its cited function does not contain."""
    head, *lines = code.splitlines()
    m = re.fullmatch(r"#\s*((?:[\w.]+/)*\w+\.py):([\w.]+)\s*", head)
    if m is None:
        return [f"first line {head!r} does not name `# path:function`"]
    file = resolve(m.group(1))
    node = definition(file, m.group(2)) if file is not None else None
    if node is None:
        return [f"{m.group(1)}:{m.group(2)} does not exist"]
    whole = file.read_text().splitlines()[node.lineno - 1:node.end_lineno]  # whole lines: trailing comments too
    source = {ln.strip() for ln in whole}
    return [ln for ln in lines if ln.strip() and ln.strip() not in source]


# ---------------------------------------------------------------------------------------- the checker itself

def test_the_checks_can_fail():
    """The resolver rejects a name that is not there, and an excerpt line the function lacks."""
    assert definition(ROOT / "numlm/ops/layernorm.py", "layernorm_backward") is not None
    assert definition(ROOT / "numlm/ops/layernorm.py", "layernorm_backwards") is None
    assert definition(ROOT / "numlm/nn/layers.py", "LayerNorm.backward") is not None
    assert definition(ROOT / "numlm/nn/layers.py", "LayerNorm.nothing") is None
    assert definition(ROOT / "numlm/ops/activations.py", "gelu_tanh_backward") is not None  # an alias
    assert definition(ROOT / "numlm/ops/activations.py", "SQRT_2_OVER_PI") is None  # a constant, not code
    assert resolve("no/such/file.py") is None
    assert missing_citations("`numlm/ops/layernorm.py:no_such_function`")
    assert not missing_citations("`ops/layernorm.py:layernorm_forward`")
    good = "# numlm/ops/layernorm.py:layernorm_backward\ndxhat = dy * gamma\n"
    assert excerpt_mismatches(good) == []
    assert excerpt_mismatches(good + "dx = dxhat\n") == ["dx = dxhat"]


# ---------------------------------------------------------------------------------------- the pages

def test_every_page_is_there_and_linked():
    assert [p.stem for p in PAGES] == sorted(EXPECTED)
    for doc in (EQUATIONS, README):
        text = doc.read_text()
        unlinked = [p.name for p in PAGES if f"derivations/{p.name})" not in text]
        assert not unlinked, f"{doc.name} does not link {unlinked}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.stem)
def test_snippets_run(page):
    """Each page's ```python blocks, run in order in one namespace; each page checks something."""
    code = blocks(page.read_text(), "python")
    assert code and any("assert" in c for c in code), f"{page.name} has no snippet that asserts"
    ns = {"__name__": f"docs_{page.stem}"}
    for i, c in enumerate(code):
        name = f"{page.name}[python block {i}]"
        linecache.cache[name] = (len(c), None, c.splitlines(True), name)  # tracebacks show the line
        exec(compile(c, name, "exec"), ns)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.stem)
def test_excerpts_are_the_code(page):
    excerpts = blocks(page.read_text(), "py")
    assert excerpts, f"{page.name} quotes no numlm lines"
    for code in excerpts:
        assert excerpt_mismatches(code) == [], code.splitlines()[0]


@pytest.mark.parametrize("doc", PAGES + [EQUATIONS], ids=lambda p: p.stem)
def test_cited_functions_exist(doc):
    text = doc.read_text()
    assert citations(text), f"{doc.name} cites no numlm function"
    assert missing_citations(text) == []
