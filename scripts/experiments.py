"""DVC experiments as table rows: the one reader that `scripts/seed_table.py` and `scripts/recipe_study.py`
share (which dvc to run, `dvc exp show --json`, the finished experiments in it, every metric a table can show,
and the mean +- sd cell).

A table names its columns as ``(header, metric)`` pairs, ``metric`` a key of ``METRICS``.
"""

from __future__ import annotations

import json
import shutil
import statistics
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

METRICS: dict[str, tuple[str, tuple[str, ...], float]] = {  # name -> (metrics file, key path, scale)
    "linear": ("metrics/linprobe.json", ("top1",), 100),
    "linear val": ("metrics/linprobe.json", ("val_top1",), 100),
    "linear rand": ("metrics/linprobe.json", ("random_init_top1",), 100),
    "linear pixels": ("metrics/linprobe.json", ("pixels_top1",), 100),
    "attentive": ("metrics/attnprobe.json", ("top1",), 100),
    "attentive val": ("metrics/attnprobe.json", ("val_top1",), 100),
    "attentive rand": ("metrics/attnprobe.json", ("random_init_top1",), 100),
    "attentive pixels": ("metrics/attnprobe.json", ("pixels_top1",), 100),
    "1-shot": ("metrics/lowshot.json", ("1shot", "pretrained", "mean"), 100),
    "1-shot rand": ("metrics/lowshot.json", ("1shot", "random_init", "mean"), 100),
    "1-shot pixels": ("metrics/lowshot.json", ("1shot", "pixels", "mean"), 100),
    "10%": ("metrics/lowshot.json", ("10pct", "pretrained", "mean"), 100),
    "10% pixels": ("metrics/lowshot.json", ("10pct", "pixels", "mean"), 100),
    "1%": ("metrics/lowshot.json", ("1pct", "pretrained", "mean"), 100),
    "1% rand": ("metrics/lowshot.json", ("1pct", "random_init", "mean"), 100),
    "1% pixels": ("metrics/lowshot.json", ("1pct", "pixels", "mean"), 100),
    "k-NN": ("metrics/knn.json", ("top1", "k10"), 100),
    "k-NN val": ("metrics/knn.json", ("val_top1", "k10"), 100),
    "k-NN rand": ("metrics/knn.json", ("random_init_top1", "k10"), 100),
    "finetune": ("metrics/finetune.json", ("top1",), 100),
    "finetune val": ("metrics/finetune.json", ("val_top1",), 100),
    "finetune rand": ("metrics/finetune.json", ("random_init_top1",), 100),
    "seg mIoU": ("metrics/seg_eval.json", ("miou",), 100),
    "seg rand": ("metrics/seg_eval.json", ("random_init_miou",), 100),
    "RankMe": ("metrics/pretrain.json", ("final_rankme",), 1),
    "online k-NN": ("metrics/pretrain.json", ("final_knn_top1",), 100),
    "images/s": ("metrics/pretrain.json", ("images_per_second",), 1),
    "steps": ("metrics/pretrain.json", ("steps",), 1),
}


def dig(tree: dict, path: Sequence[str]):
    """``tree[path[0]][path[1]]...``, or None where a key is missing."""
    for key in path:
        if not isinstance(tree, dict) or key not in tree:
            return None
        tree = tree[key]
    return tree


def values(data: dict, columns: Sequence[tuple[str, str]]) -> dict[str, float | None]:
    """header -> the experiment's value of its metric (scaled; None where the experiment has none), from one
    experiment's ``data`` in `dvc exp show --json`."""
    out = {}
    for header, metric in columns:
        path, keys, scale = METRICS[metric]
        v = dig(data, ("metrics", path, "data", *keys))
        out[header] = None if v is None else v * scale
    return out


def params_of(data: dict) -> dict:
    """The experiment's composed params.yaml."""
    return dig(data, ("params", "params.yaml", "data")) or {}


def mean_sd(vals: Sequence[float | None], digits: int = 1) -> str:
    """A table cell: empty without values, the value alone, else ``mean +- sample sd``."""
    vals = [v for v in vals if v is not None]
    if not vals:
        return ""
    if len(vals) == 1:
        return f"{vals[0]:.{digits}f}"
    return f"{statistics.mean(vals):.{digits}f} +- {statistics.stdev(vals):.{digits}f}"


def dvc_command(hint: str) -> str:
    """The project's dvc (beside this interpreter, in .venv), else the one on PATH; exits with ``hint`` if none."""
    beside = Path(sys.executable).parent / "dvc"  # the project's .venv, when it is not on PATH
    found = str(beside) if beside.exists() else shutil.which("dvc")
    if found is None:
        sys.exit(f"dvc not found: {hint}")
    return found


def exp_show(dvc: str, all_commits: bool = False) -> list[dict]:
    """`dvc exp show --json`, parsed: the current commit's experiments, or with ``all_commits`` every commit's
    (`-A`: experiments survive the commits made after them, but `dvc exp show` alone lists only HEAD's)."""
    cmd = [dvc, "exp", "show", "--json"] + ["-A"] * all_commits
    return json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)


def finished(show: list[dict]) -> Iterator[tuple[str, dict]]:
    """(name, rev entry) of every experiment in `dvc exp show --json` that has results of its own; queued,
    running and failed ones are named on stderr and skipped. A name found again (on an older commit, with
    ``-A``: `dvc exp show` lists the newest commit first) is named on stderr and skipped too."""
    seen = set()
    for commit in show:
        for exp in commit.get("experiments") or []:
            state = (exp.get("executor") or {}).get("state")
            if state in ("queued", "running", "failed"):  # no results of its own yet (or none at all)
                print(f"skipped {exp.get('name')}: {state}", file=sys.stderr)
                continue
            for rev in exp.get("revs") or []:
                name = rev.get("name") or exp.get("name") or ""
                if name in seen:
                    older = str(commit.get("rev"))[:7]
                    print(f"skipped {name} of {older}: a newer experiment has the name", file=sys.stderr)
                elif name and rev.get("data") and not rev.get("error"):
                    seen.add(name)
                    yield name, rev
