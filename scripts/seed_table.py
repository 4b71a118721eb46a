"""Turn `dvc exp show --json` into the seed table of docs/results.md: one row per experiment, then mean +- spread.

Reads the experiments of the current commit whose names start with a ``--prefix`` (``make seeds`` names
them ``<prefix>-<objective>-seed<N>``; several prefixes put several studies' runs in one table), groups them by
objective and prints a Markdown table of the gate's numbers: linear-probe top-1 (pretrained, random-init encoder,
raw pixels, the gap), k-NN top-1 at k = 10 (pretrained, random init), segmentation mIoU (pretrained, random
init) and finetuning top-1 (pretrained, random init).
Each group ends with its mean and sample standard deviation; ``--check`` exits 1 unless every seed of
every group meets the demo gate (probe gap >= 5 points, k-NN and segmentation above random init).
A second table (``--view protocols``) puts the frozen-feature protocols side by side: the linear probe, the
attentive probe, 1-shot and 1% linear probes (each with its random-init and pixel baselines), and the
pretraining health monitor's final RankMe and online k-NN.

    python scripts/seed_table.py [--prefix seeds ...] [--workspace] [--check] [--view gate|protocols|both]
                                 [--json exp_show.json] [-A]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

COLUMNS = [  # (header, metrics file, key path, scale)
    ("probe", "metrics/linprobe.json", ("top1",), 100),
    ("probe rand", "metrics/linprobe.json", ("random_init_top1",), 100),
    ("probe pixels", "metrics/linprobe.json", ("pixels_top1",), 100),
    ("k-NN k10", "metrics/knn.json", ("top1", "k10"), 100),
    ("k-NN rand", "metrics/knn.json", ("random_init_top1", "k10"), 100),
    ("seg mIoU", "metrics/seg_eval.json", ("miou",), 100),
    ("seg rand", "metrics/seg_eval.json", ("random_init_miou",), 100),
    ("finetune", "metrics/finetune.json", ("top1",), 100),
    ("finetune rand", "metrics/finetune.json", ("random_init_top1",), 100),
]
PROTOCOLS = [  # the second table (--view protocols): the frozen-feature protocols side by side, and health
    ("linear", "metrics/linprobe.json", ("top1",), 100),
    ("linear rand", "metrics/linprobe.json", ("random_init_top1",), 100),
    ("attentive", "metrics/attnprobe.json", ("top1",), 100),
    ("attentive rand", "metrics/attnprobe.json", ("random_init_top1",), 100),
    ("attentive pixels", "metrics/attnprobe.json", ("pixels_top1",), 100),
    ("1-shot", "metrics/lowshot.json", ("1shot", "pretrained", "mean"), 100),
    ("1-shot rand", "metrics/lowshot.json", ("1shot", "random_init", "mean"), 100),
    ("1-shot pixels", "metrics/lowshot.json", ("1shot", "pixels", "mean"), 100),
    ("1%", "metrics/lowshot.json", ("1pct", "pretrained", "mean"), 100),
    ("1% rand", "metrics/lowshot.json", ("1pct", "random_init", "mean"), 100),
    ("1% pixels", "metrics/lowshot.json", ("1pct", "pixels", "mean"), 100),
    ("RankMe", "metrics/pretrain.json", ("final_rankme",), 1),
    ("online k-NN", "metrics/pretrain.json", ("final_knn_top1",), 100),
]


def _dig(tree: dict, path: tuple[str, ...]):
    for key in path:
        if not isinstance(tree, dict) or key not in tree:
            return None
        tree = tree[key]
    return tree


def _row(name: str, data: dict) -> dict:
    params = _dig(data, ("params", "params.yaml", "data")) or {}
    row = {"name": name, "seed": params.get("seed"), "objective": _dig(params, ("objective", "name"))}
    for header, path, keys, scale in COLUMNS + PROTOCOLS:
        value = _dig(data, ("metrics", path, "data", *keys))
        row[header] = None if value is None else value * scale
    return row


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


def finished(show: list[dict]):
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


def experiments(show: list[dict], prefix: str | tuple[str, ...], workspace: bool = False) -> list[dict]:
    """Flatten `dvc exp show --json` into {name, seed, objective, <column>: value} for names that start with
    ``prefix`` (a string, or a tuple of them), and the workspace's results, named "workspace", with ``workspace``."""
    rows = []
    if workspace:
        ws = next((c for c in show if c.get("rev") == "workspace"), None)
        if ws is None or not ws.get("data"):
            raise SystemExit("no workspace results in `dvc exp show`: run `make repro` first")
        rows.append(_row("workspace", ws["data"]))
    rows += [_row(name, rev["data"]) for name, rev in finished(show) if name.startswith(prefix)]
    return sorted(rows, key=lambda r: (str(r["objective"]), r["seed"] if r["seed"] is not None else -1))


def _fmt(v, digits: int = 1) -> str:
    return "" if v is None else f"{v:.{digits}f}"


def _gap(row: dict):
    return None if row["probe"] is None or row["probe rand"] is None else row["probe"] - row["probe rand"]


def meets_gate(row: dict) -> bool:
    gap = _gap(row)
    return (
        gap is not None
        and gap >= 5.0
        and None not in (row["k-NN k10"], row["k-NN rand"], row["seg mIoU"], row["seg rand"])
        and row["k-NN k10"] > row["k-NN rand"]
        and row["seg mIoU"] > row["seg rand"]
    )


def table(rows: list[dict], view: str = "gate") -> str:
    """The gate's table (probe gap first), or with ``view="protocols"`` the evaluation protocols' table."""
    if view == "gate":
        columns = ["probe", "probe rand", "gap", "probe pixels"] + [h for h, *_ in COLUMNS[3:]]
    else:
        columns = [h for h, *_ in PROTOCOLS]
    headers = ["objective", "seed", *columns]
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(str(r["objective"]), []).append(r)
    for objective, group in groups.items():
        for r in group:
            cells = [objective, str(r["seed"])] + [_fmt(_gap(r), 2) if h == "gap" else _fmt(r[h]) for h in columns]
            lines.append("| " + " | ".join(cells) + " |")
        if len(group) > 1:
            cells = [f"**{objective} mean +- sd**", f"{len(group)} seeds"]
            for h in columns:
                vals = [_gap(r) if h == "gap" else r[h] for r in group]
                vals = [v for v in vals if v is not None]
                d = 2 if h == "gap" else 1  # the gap is read against the gate's 5 points
                # a column with fewer than two values (a stage some seeds did not run) has no spread
                spread = f"{statistics.mean(vals):.{d}f} +- {statistics.stdev(vals):.{d}f}" if len(vals) > 1 else ""
                cells.append(spread)
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prefix", nargs="+", default=["seeds"], help="experiment name prefixes (make seeds PREFIX=...)")
    ap.add_argument("--json", help="read this saved `dvc exp show --json` output instead of running dvc")
    ap.add_argument("-A", "--all-commits", action="store_true", help="experiments of every commit, not only HEAD's")
    ap.add_argument("--check", action="store_true", help="exit 1 unless every seed meets the demo gate")
    ap.add_argument("--workspace", action="store_true", help="also a row of the workspace's own results (make repro)")
    ap.add_argument(
        "--view", choices=["gate", "protocols", "both"], default="both",
        help="gate: probe gap, k-NN, segmentation, finetuning; protocols: linear vs attentive probe, low-shot, "
        "the health monitor's final values",
    )  # fmt: skip
    args = ap.parse_args()
    if args.json:
        with open(args.json) as f:
            show = json.load(f)
    else:
        show = exp_show(dvc_command("run `make seed-table`, or activate the project's .venv"), args.all_commits)
    rows = experiments(show, tuple(args.prefix), args.workspace)
    if not rows:
        sys.exit(f"no experiment named {'* or '.join(args.prefix)}* in `dvc exp show`: run `make seeds` first")
    views = ["gate", "protocols"] if args.view == "both" else [args.view]
    print("\n\n".join(table(rows, v) for v in views))
    if args.check:
        failed = [r["name"] for r in rows if not meets_gate(r)]
        if failed:
            sys.exit(f"gate not met (probe gap >= 5, k-NN and seg above random init) by: {', '.join(failed)}")
        print(f"gate met by all {len(rows)} experiments")


if __name__ == "__main__":
    main()
