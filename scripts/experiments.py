"""DVC experiments as table rows: the one reader that `scripts/seed_table.py` and `scripts/recipe_study.py`
share (which dvc to run, `dvc exp show --json`, the finished experiments in it, every metric a table can show,
and the mean +- sd cell), and a study's committed record of them.

A table names its columns as ``(header, metric)`` pairs, ``metric`` a key of ``METRICS``.

DVC experiments live in the git refs of the repository they ran in (``refs/exps``): a clone, a push of the
branch, a new machine has none of them. So a study keeps a record beside its grid file
(``scripts/study_curve.yaml`` -> ``scripts/study_curve.runs.json``), committed with the code: per experiment its
name, the commit it ran on, its params and metrics files as `dvc exp show --json` gave them, and its stage
times. ``with_record`` puts the recorded experiments after the live ones in `dvc exp show`'s shape, so every
table reads them alike; a finished experiment of the same name in ``dvc exp show`` wins over its record.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import statistics
import subprocess
import sys
from collections.abc import Iterable, Iterator, Sequence
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


def finished(show: list[dict], quiet: bool = False) -> Iterator[tuple[str, dict]]:
    """(name, rev entry) of every experiment in `dvc exp show --json` that has results of its own; queued,
    running and failed ones are named on stderr (unless ``quiet``) and skipped. A name found again (on an older
    commit, with ``-A``: `dvc exp show` lists the newest commit first) is named on stderr and skipped too. Each
    rev entry gains ``baseline``: the commit it ran on."""
    seen = set()
    say = (lambda _: None) if quiet else (lambda line: print(line, file=sys.stderr))
    for commit in show:
        for exp in commit.get("experiments") or []:
            state = (exp.get("executor") or {}).get("state")
            if state in ("queued", "running", "failed"):  # no results of its own yet (or none at all)
                say(f"skipped {exp.get('name')}: {state}")
                continue
            for rev in exp.get("revs") or []:
                name = rev.get("name") or exp.get("name") or ""
                if name in seen:
                    say(f"skipped {name} of {str(commit.get('rev'))[:7]}: a newer experiment has the name")
                elif name and rev.get("data") and not rev.get("error"):
                    seen.add(name)
                    yield name, rev | {"baseline": commit.get("rev")}


def study_run(name: str, prefix: str, variants: Iterable[str]) -> tuple[str, int] | None:
    """(variant, seed) of a study's experiment, named ``<prefix>-<variant>-s<seed>`` (`scripts/recipe_study.py`
    names them so); None for any other name."""
    alternatives = "|".join(map(re.escape, sorted(variants, key=len, reverse=True)))
    match = re.fullmatch(rf"{re.escape(prefix)}-({alternatives})-s(\d+)", name)
    return (match[1], int(match[2])) if match else None


def record_path(grid: Path) -> Path:
    """The committed record of a study's experiments, beside its grid file: ``<grid stem>.runs.json``."""
    return grid.with_name(f"{grid.stem}.runs.json")


def read_record(path: Path) -> dict[str, dict]:
    """name -> recorded run (``baseline``, ``rev``, ``stage_times``, ``data``); empty where there is no record. A
    file that is not a record exits with one line naming it."""
    if not path.exists():
        return {}
    try:
        runs = json.loads(path.read_text())["runs"]
        for run in runs.values():
            if not {"baseline", "rev", "stage_times", "data"} <= set(run) or "metrics" not in run["data"]:
                raise KeyError(f"a run lacks one of baseline, rev, stage_times, data.metrics: {sorted(run)}")
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        sys.exit(f"{path}: not a study record ({type(e).__name__}: {e})")
    return runs


def write_record(path: Path, runs: dict[str, dict]) -> Path:
    """Add ``runs`` (name -> rev entry of ``finished``, with ``stage_times``) to the record at ``path``, a run of
    the same name replaced; written whole to a temporary file, then renamed over the record."""
    record = read_record(path) | {
        name: {
            "baseline": run["baseline"],
            "rev": run["rev"],
            "stage_times": run["stage_times"],
            "data": {k: run["data"][k] for k in ("timestamp", "params", "metrics") if k in run["data"]},
        }
        for name, run in runs.items()
    }
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps({"runs": dict(sorted(record.items()))}, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)
    return path


def with_record(show: list[dict], path: Path) -> list[dict]:
    """``show`` (`dvc exp show --json`) and after it, in the same shape, each recorded run of ``path`` whose name
    ``show`` has no finished experiment of."""
    live = {name for name, _ in finished(show, quiet=True)}
    by_commit: dict[str, list[dict]] = {}
    for name, run in read_record(path).items():
        if name not in live:
            rev = {"name": name, "rev": run["rev"], "data": run["data"], "stage_times": run["stage_times"]}
            by_commit.setdefault(run["baseline"], []).append({"name": name, "revs": [rev]})
    return show + [{"rev": commit, "experiments": exps} for commit, exps in by_commit.items()]
