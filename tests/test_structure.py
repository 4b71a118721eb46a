"""The code's shape: no import circle inside ``ijepa/`` (lazy imports inside functions count)."""

from __future__ import annotations

import ast
import subprocess
import sys
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


WORK = {"backward", "zero_grad", "optim", "functional", "no_grad", "autocast"}  # training or evaluation math


def work_in(tree: ast.AST) -> set[str]:
    """What in a module's syntax tree is training or evaluation work rather than glue: an optimiser, a backward
    pass, torch.nn.functional, gradient switches, a model class."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr in WORK:
            found.add(node.attr)
        elif isinstance(node, ast.ImportFrom | ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[-1] in WORK}
            found |= (
                {node.module}
                if isinstance(node, ast.ImportFrom) and node.module in ("torch.optim", "torch.nn")
                else set()
            )
        elif isinstance(node, ast.ClassDef) and any("Module" in ast.unparse(b) for b in node.bases):
            found.add(f"class {node.name}")
    return found


def test_a_stage_doing_work_is_caught():
    code = (
        "import torch.nn.functional as F\nclass Head(nn.Module):\n    pass\nloss.backward()\nopt = torch.optim.AdamW(p)"
    )
    assert work_in(ast.parse(code)) == {"torch.nn.functional", "class Head", "backward", "optim"}
    assert work_in(ast.parse("metrics = job.publish(metrics, plots=[png])")) == set()


def test_every_stage_is_glue_that_ruff_formats():
    """Stages read params, build specs, wire callbacks and publish (``pipeline.stagerun.StageRun``); the work lives
    in ijepa/ and pipeline/, and no call is packed past ruff's formatting to look short."""
    stages = sorted((ROOT / "stages").glob("*.py"))
    assert len([f for f in stages if f.stem != "__init__"]) == 12
    work = {f.stem: work_in(ast.parse(f.read_text(), str(f))) for f in stages}
    assert {stage: found for stage, found in work.items() if found} == {}
    assert [f.name for f in stages if "fmt: skip" in f.read_text() or "fmt: off" in f.read_text()] == []
    ruff = subprocess.run(
        [sys.executable, "-m", "ruff", "format", "--check", "--quiet", "stages"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert ruff.returncode == 0, ruff.stdout + ruff.stderr


def test_one_warmup_cosine_schedule_in_the_library():
    """Every loop takes its lr from ``ijepa.schedules.warmup_cosine``; no other module writes a cosine of pi."""
    texts = {f.relative_to(ROOT).as_posix(): f.read_text() for f in (ROOT / "ijepa").rglob("*.py")}
    cosines = {name for name, text in texts.items() if "cos(math.pi" in text or "cos(np.pi" in text}
    assert cosines == {"ijepa/schedules.py"}
    users = {name for name, text in texts.items() if "warmup_cosine(" in text}
    loops = ["finetune", "seg/train", "eval/attentive", "eval/attentive_stream", "eval/linear", "schedules"]
    assert users == {f"ijepa/{m}.py" for m in loops}
