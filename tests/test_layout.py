"""The layout's promises, checked on the source: no import cycle, no script imported by another module, no
data set named outside datasets.py, and every citation in the paper's own numbering."""
import ast
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODULES = sorted(f[:-3] for f in os.listdir(ROOT) if f.endswith(".py"))
SCRIPTS = {"train", "sample", "evaluate", "bench"}
# the paper's sections (arXiv:1503.03585 v8): a citation of any other § points to something else
SECTIONS = {"1", "1.1", "1.2", "2", "2.1", "2.2", "2.3", "2.4", "2.4.1", "2.5", "2.5.1", "2.5.2", "2.5.3", "2.5.4",
            "2.6", "3", "3.1", "3.1.1", "3.1.2", "3.2", "3.2.1", "3.2.2", "4"}


def source(path):
    with open(path, encoding="utf-8") as f:
        return f.read()


def imports(name):
    """The project modules that module name imports, anywhere in its body."""
    found = set()
    for node in ast.walk(ast.parse(source(os.path.join(ROOT, name + ".py")))):
        if isinstance(node, ast.Import):
            found.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module.split(".")[0])
    return found & set(MODULES)


def test_no_import_cycle_and_no_script_imported_by_a_module():
    graph = {m: imports(m) for m in MODULES}
    for m, deps in graph.items():
        if m != "bench":                      # bench.py times train.py's own start-up
            assert not deps & SCRIPTS, (m, deps & SCRIPTS)
    state = {}

    def visit(m, path):
        if state.get(m) == "done":
            return
        assert state.get(m) != "open", "import cycle: " + " -> ".join(path + [m])
        state[m] = "open"
        for d in sorted(graph[m]):
            visit(d, path + [m])
        state[m] = "done"
    for m in MODULES:
        visit(m, [])


def test_the_check_finds_a_cycle(monkeypatch):
    """The cycle check itself: a graph with a -> b -> a must fail it."""
    monkeypatch.setattr(__import__(__name__), "MODULES", ["a", "b"])
    monkeypatch.setattr(__import__(__name__), "imports", lambda m: {"a": {"b"}, "b": {"a"}}[m])
    with pytest.raises(AssertionError, match="import cycle"):
        test_no_import_cycle_and_no_script_imported_by_a_module()


def test_no_data_set_is_compared_by_name_outside_datasets_py():
    for m in MODULES:
        if m != "datasets":
            assert not re.search(r"""[=!]=\s*["'](swissroll|heartbeat)["']|["'](swissroll|heartbeat)["']\s*[=!]=""",
                                 source(os.path.join(ROOT, m + ".py"))), m


@pytest.mark.parametrize("path", sorted(
    [os.path.join(ROOT, f) for f in os.listdir(ROOT) if f.endswith((".py", ".md"))]
    + [os.path.join(ROOT, "tests", f) for f in os.listdir(os.path.join(ROOT, "tests")) if f.endswith(".py")]))
def test_citations_use_the_papers_numbering_and_nothing_outside_the_repository(path):
    text = source(path)
    if os.path.basename(path) == "test_layout.py":
        return
    bad = [s for s in re.findall(r"§(\d+(?:\.\d+)*)", text) if s not in SECTIONS]
    assert not bad, f"sections the paper does not have: {bad}"
    assert not re.search(r"shared/|paper\.md|numba-notes", text)
