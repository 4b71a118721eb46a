"""A recipe study: a grid of DVC experiments, one per variant and seed, and one table of each variant's stage
time and results against their baselines.

    python scripts/recipe_study.py scripts/study_demo.yaml [--seeds 0 1 2] [--only NAME ...] [--table] [-A]
                                   [--in-place]

The grid file names the experiments' prefix, the stages to run (all of them when absent) and the variants,
each a list of ``key=value`` params overrides (``dvc exp run -S``)::

    prefix: study
    stages: [finetune]          # optional: dvc exp run's targets
    single_item: true           # optional: only those stages, on the workspace's upstream outputs
    common: [finetune.epochs=2, finetune.warmup_epochs=1]   # optional: the recipe every variant starts from
    variants:
      base: []
      ft-ep4: [finetune.epochs=4, finetune.warmup_epochs=0.5]

A variant's overrides are ``common``'s with its own on top (its own win where both name a key). A committed
grid names in ``common`` every param of the recipe its table describes, so that it runs the same recipe after the
defaults move (``tests/test_scripts.py`` checks every key against the composed params).

Every variant and seed runs as ``dvc exp run --temp -n <prefix>-<variant>-s<seed> -S seed=<seed> -S ...``
(the workspace is left alone; an experiment of that name already in ``dvc exp show`` is not run again, so an
interrupted study resumes and ``--table`` prints the table of what has run; ``-A`` counts the experiments of
every commit, so a study begun before a commit goes on after it). With ``--in-place`` each run is
``dvc exp run`` without ``--temp``: it runs in the workspace, so a long pretraining that is interrupted (kill,
reboot, end of an allocation) continues from its checkpoint in ``models/resume/pretrain`` when the study is
started again, where a ``--temp`` run would start over in a new temporary folder; the workspace then holds the
last run's outputs (``git checkout -- . && dvc checkout`` returns to the commit's). With ``single_item`` the targets
run with ``--single-item``: the workspace's upstream outputs are used as they are, even where code they depend on
has changed since they were made (a study of finetuning recipes on the committed encoder, after a change to the
finetuning code, need not pretrain again; the table's stage times are then those recorded for those outputs).
Stages whose deps and params an
earlier run already had are restored from DVC's run cache (not `prepare` and `pretrain`: DVC does not
run-cache stages with persistent outputs, so a new seed pretrains again): each stage's measured wall time (from DVC's
"Running stage" line to the next, as ``scripts/time_repro.py`` measures) is kept under the hash of its
command, deps and params in ``outputs/stage_times.json`` (``make repro`` records its stages there too), so a
variant's time is the sum over its stages of what they took when they ran; a stage whose time was never
recorded leaves the total empty. Results are read from each experiment's metrics files: compare the variants
on the validation columns (``val``) and report them on test.

Each experiment that finishes is added to the study's record (``scripts/study_curve.yaml`` ->
``scripts/study_curve.runs.json``; ``scripts/experiments.py``): commit it, and a clone, which has none of the
experiments, prints the same table and counts those runs as run. ``--record`` adds every finished experiment
of the grid that ``dvc exp show`` lists (one run in another clone and brought here with ``dvc exp pull -A
--no-cache <clone>``, say) and runs nothing. To run a recorded experiment again, take it out of the record.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from scripts.experiments import (
    dvc_command,
    exp_show,
    finished,
    mean_sd,
    record_path,
    study_run,
    values,
    with_record,
    write_record,
)
from scripts.time_repro import TIMES, record_times, stage_keys
from scripts.time_repro import run as timed_run

COLUMNS = [  # (header, metric of scripts/experiments.py); "val" columns choose, the others report
    ("linear val", "linear val"),
    ("linear", "linear"),
    ("linear rand", "linear rand"),
    ("linear pixels", "linear pixels"),
    ("attentive val", "attentive val"),
    ("attentive", "attentive"),
    ("attentive rand", "attentive rand"),
    ("1%", "1%"),
    ("1% pixels", "1% pixels"),
    ("k-NN val", "k-NN val"),
    ("k-NN", "k-NN"),
    ("k-NN rand", "k-NN rand"),
    ("finetune val", "finetune val"),
    ("finetune", "finetune"),
    ("finetune rand", "finetune rand"),
    ("seg mIoU (val)", "seg mIoU"),
    ("seg rand", "seg rand"),
]


def load_grid(path: Path) -> dict:
    """The grid file, checked: a missing file, bad YAML or a malformed variant exits with one line naming it."""
    if not path.is_file():
        sys.exit(f"{path}: no such grid file")
    try:
        grid = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        sys.exit(f"{path}: not valid YAML ({str(e).splitlines()[0]})")
    if not isinstance(grid, dict) or not isinstance(grid.get("variants"), dict) or not grid["variants"]:
        sys.exit(f"{path}: needs a 'variants' mapping of name -> list of key=value overrides")
    grid.setdefault("common", [])
    for name, sets in [("common", grid["common"]), *((f"variants.{v}", s) for v, s in grid["variants"].items())]:
        if not isinstance(sets, list) or not all(isinstance(s, str) and "=" in s for s in sets):
            sys.exit(f"{path}: {name} must be a list of key=value strings, got {sets!r}")
    grid["variants"] = {name: overrides(grid["common"], sets) for name, sets in grid["variants"].items()}
    if not isinstance(grid.setdefault("single_item", False), bool):
        sys.exit(f"{path}: single_item must be true or false, got {grid['single_item']!r}")
    if grid["single_item"] and not grid.get("stages"):
        sys.exit(f"{path}: single_item needs the stages to run")
    grid.setdefault("prefix", path.stem)
    grid.setdefault("stages", [])
    return grid


def overrides(common: list[str], own: list[str]) -> list[str]:
    """``common``'s key=value overrides with ``own``'s on top, each key once (in common's order, then own's)."""
    merged = {s.split("=", 1)[0]: s for s in common}
    merged.update({s.split("=", 1)[0]: s for s in own})
    return list(merged.values())


def lock_of(rev: str) -> str:
    """The dvc.lock of an experiment's commit."""
    return subprocess.run(["git", "show", f"{rev}:dvc.lock"], check=True, capture_output=True, text=True).stdout


def stage_times(exp: dict, times: dict) -> dict[str, float | None]:
    """stage -> seconds of an experiment's stages: a recorded run's own, else looked up in ``times``
    (``outputs/stage_times.json``) under its dvc.lock's keys (None where that stage's time was never recorded)."""
    if "stage_times" in exp:
        return exp["stage_times"]
    return {s: times.get(f"{s}:{k}") for s, k in stage_keys(lock_of(exp["rev"])).items()}


def row(name: str, exp: dict, times: dict) -> dict:
    r = {"name": name} | values(exp["data"], COLUMNS)
    r["stage_times"] = stage_times(exp, times)
    r["seconds"] = None if None in r["stage_times"].values() else sum(r["stage_times"].values())
    r["pretrain s"] = r["stage_times"].get("pretrain")
    r["finetune s"] = r["stage_times"].get("finetune")
    return r


SECONDS = ("seconds", "pretrain s", "finetune s")


def table(rows_by_variant: dict[str, list[dict]]) -> str:
    """One row per variant: its value, or mean +- sd over its seeds."""
    headers = ["variant", "seeds", *SECONDS, *[h for h, _ in COLUMNS]]
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for variant, rows in rows_by_variant.items():
        cells = [mean_sd([r[h] for r in rows], 0 if h in SECONDS else 1) for h in headers[2:]]
        cells = [variant, str(len(rows)), *cells]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("grid", type=Path, help="the study's YAML file (prefix, stages, variants)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--only", nargs="+", help="run only these variants (the table shows every one that has run)")
    ap.add_argument("--table", action="store_true", help="print the table of what has run; run nothing")
    ap.add_argument(
        "--record", action="store_true",
        help="add every finished experiment of the grid in `dvc exp show` to the study's record; run nothing",
    )  # fmt: skip
    ap.add_argument(
        "-A", "--all-commits", action="store_true",
        help="count the experiments of every commit (`dvc exp show -A`) as run, not only HEAD's",
    )  # fmt: skip
    ap.add_argument(
        "--in-place", action="store_true",
        help="run in the workspace (no --temp), so an interrupted pretraining resumes from its checkpoint",
    )  # fmt: skip
    args = ap.parse_args()
    grid = load_grid(args.grid)
    dvc, prefix, record = dvc_command("activate the project's .venv"), grid["prefix"], record_path(args.grid)
    times = json.loads(TIMES.read_text()) if TIMES.exists() else {}

    def show(all_commits: bool = args.all_commits) -> dict[str, dict]:
        return dict(finished(with_record(exp_show(dvc, all_commits), record)))

    if args.record:
        live = dict(finished(exp_show(dvc, args.all_commits)))
        live = {n: e for n, e in live.items() if study_run(n, prefix, grid["variants"])}
        live = {n: e | {"stage_times": stage_times(e, times)} for n, e in live.items()}
        print(f"{write_record(record, live)}: {len(live)} experiments recorded ({', '.join(sorted(live))})")
        return
    done = show()
    names = {v: [f"{prefix}-{v}-s{s}" for s in args.seeds] for v in grid["variants"]}
    for variant, sets in grid["variants"].items():
        if args.table or (args.only and variant not in args.only):
            continue
        for seed, name in zip(args.seeds, names[variant], strict=True):
            if name in done:
                print(f"{name}: already run", flush=True)
                continue
            cmd = ["exp", "run", *(["--temp"] * (not args.in_place)), "-n", name, "-S", f"seed={seed}"]
            cmd += [a for s in sets for a in ("-S", s)] + ["--single-item"] * grid["single_item"] + grid["stages"]
            print(f"\n{name}: dvc {' '.join(cmd)}", flush=True)
            code, report = timed_run(cmd, dvc=dvc)
            if code != 0:
                sys.exit(f"{name}: dvc exp run failed (exit code {code})")
            done = show()
            if name not in done:  # a commit made while it ran: the experiment is listed under its older baseline
                done |= {name: show(all_commits=True)[name]}
            times = record_times(report["stages"], lock_of(done[name]["rev"]))
            write_record(record, {name: done[name] | {"stage_times": stage_times(done[name], times)}})
    rows = {v: [row(n, done[n], times) for n in ns if n in done] for v, ns in names.items()}
    rows = {v: rs for v, rs in rows.items() if rs}
    if not rows:
        sys.exit(f"no experiment of {args.grid} has run yet")
    print(f"\n{prefix}: test top-1 and mIoU in %, choose on the val columns; seconds: the chain's stage time\n")
    print(table(rows))


if __name__ == "__main__":
    main()
