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
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from scripts.experiments import dvc_command, exp_show, finished, mean_sd, params_of, values

COLUMNS = [  # the gate's table: (header, metric of scripts/experiments.py)
    ("probe", "linear"),
    ("probe rand", "linear rand"),
    ("probe pixels", "linear pixels"),
    ("k-NN k10", "k-NN"),
    ("k-NN rand", "k-NN rand"),
    ("seg mIoU", "seg mIoU"),
    ("seg rand", "seg rand"),
    ("finetune", "finetune"),
    ("finetune rand", "finetune rand"),
]
PROTOCOLS = [  # the second table (--view protocols): the frozen-feature protocols side by side, and health
    (m, m)
    for m in (
        "linear", "linear rand", "attentive", "attentive rand", "attentive pixels", "1-shot", "1-shot rand",
        "1-shot pixels", "1%", "1% rand", "1% pixels", "RankMe", "online k-NN",
    )
]  # fmt: skip


def _row(name: str, data: dict) -> dict:
    params = params_of(data)
    row = {"name": name, "seed": params.get("seed"), "objective": (params.get("objective") or {}).get("name")}
    return row | values(data, COLUMNS + PROTOCOLS)


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
                vals = [v for v in (_gap(r) if h == "gap" else r[h] for r in group) if v is not None]
                # the gap is read against the gate's 5 points; a column with fewer than two values (a stage some
                # seeds did not run) has no spread
                cells.append(mean_sd(vals, 2 if h == "gap" else 1) if len(vals) > 1 else "")
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
