"""The code's shape: no import circle inside ``ijepa/`` (lazy imports inside functions count)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def import_graph(package: Path) -> dict[str, set[str]]:
    """Module -> the package's modules it imports anywhere in its body, relative imports resolved."""
    files = {}
    for f in package.rglob("*.py"):
        parts = list(f.relative_to(package.parent).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        files[".".join(parts[:-1] if is_package else parts)] = (f, is_package)
    graph = {}
    for name, (f, is_package) in files.items():
        here = name.split(".") if is_package else name.split(".")[:-1]
        deps = set()
        for node in ast.walk(ast.parse(f.read_text(), str(f))):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = ".".join([*here[: len(here) - node.level + 1], node.module or ""]).rstrip(".")
                else:
                    base = node.module or ""
                found = [base, *(f"{base}.{a.name}" for a in node.names)]
            elif isinstance(node, ast.Import):
                found = [a.name for a in node.names]
            else:
                continue
            deps |= {m for m in found if m in files and m != name}
        graph[name] = deps
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan, iteratively)."""
    index, low, on_stack, stack, out = {}, {}, set(), [], []
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root), on_stack.add(root)
        while work:
            v, children = work[-1]
            w = next(children, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w), on_stack.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                elif w in on_stack:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
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
    return out


def test_the_import_graph_finds_a_circle_when_there_is_one():
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert circles({"a": {"b"}, "b": set()}) == []


def test_no_import_circle_in_the_library():
    graph = import_graph(ROOT / "ijepa")
    assert circles(graph) == []
    assert "ijepa.torchfile" in graph["ijepa.interop"] and "ijepa.interop" in graph["ijepa.checkpoint"]


def test_every_stage_run_is_glue_of_at_most_80_lines():
    """Stages read params, build specs, wire callbacks and write outputs; the work lives in ijepa/ and pipeline/."""
    lengths = {}
    for f in sorted((ROOT / "stages").glob("*.py")):
        for node in ast.parse(f.read_text(), str(f)).body:
            if isinstance(node, ast.FunctionDef) and node.name == "run":
                lengths[f.stem] = node.end_lineno - node.lineno + 1
    assert len(lengths) == 12, sorted(lengths)
    assert {stage: n for stage, n in lengths.items() if n > 80} == {}
