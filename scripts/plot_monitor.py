"""Draw the pretraining health monitor (RankMe, feature spread, online k-NN) of the workspace's run beside
those of DVC experiments, one panel per measure: a collapsing run next to a healthy one.

Each experiment's ``metrics/pretrain_monitor.csv`` is read from its Git ref (``refs/exps/...``), so any
experiment of this repository can be drawn, also one run with ``--temp``.

    dvc exp run -n collapse-lr1.5e-3 -S optim.lr=0.0015 pretrain     # `make monitor-collapse` runs both
    python scripts/plot_monitor.py --exp collapse-lr1.5e-3 --out docs/monitor_collapse.png
"""

from __future__ import annotations

import argparse
import csv
import io
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pipeline.outputs import new_figure, save_figure  # noqa: E402

CSV = "metrics/pretrain_monitor.csv"
MEASURES = {
    "rankme": "RankMe (effective rank)",
    "feature_spread": "feature spread",
    "knn_top1": "online k-NN top-1",
    "loss": "training loss (epoch mean)",
}


def _rows(text: str) -> list[dict]:
    return [{k: float(v) for k, v in r.items()} for r in csv.DictReader(io.StringIO(text))]


def _git_show(ref: str, path: str) -> str:
    r = subprocess.run(["git", "show", f"{ref}:{path}"], cwd=ROOT, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"plot_monitor: {path} not found in {ref}: {r.stderr.strip()}")
    return r.stdout


def experiment_ref(name: str) -> str:
    """The Git ref of the DVC experiment called ``name`` (the newest if several baselines have one)."""
    refs = subprocess.run(
        ["git", "for-each-ref", "--sort=-committerdate", "--format=%(refname)", "refs/exps"],
        cwd=ROOT, capture_output=True, text=True, check=True,
    ).stdout.split()  # fmt: skip
    for ref in refs:
        if ref.rsplit("/", 1)[-1] == name:
            return ref
    raise SystemExit(f"plot_monitor: no DVC experiment named {name!r} (dvc exp list --all-commits)")


def epoch_losses(steps_csv: str) -> dict[float, float]:
    """Epoch -> mean loss of its steps, from a ``pretrain_steps.csv`` text."""
    sums: dict[float, list[float]] = {}
    for r in _rows(steps_csv):
        sums.setdefault(r["epoch"], []).append(r["loss"])
    return {e + 1: sum(v) / len(v) for e, v in sums.items()}  # the monitor's epoch count after that epoch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--exp", action="append", default=[], help="a DVC experiment's name (repeatable)")
    ap.add_argument("--label", default="workspace", help="legend label of the workspace's run")
    ap.add_argument("--out", default="docs/monitor_collapse.png")
    args = ap.parse_args()
    runs = {args.label: ((ROOT / CSV).read_text(), (ROOT / "metrics/pretrain_steps.csv").read_text())}
    for name in args.exp:
        ref = experiment_ref(name)
        runs[name] = (_git_show(ref, CSV), _git_show(ref, "metrics/pretrain_steps.csv"))
    fig, axes = new_figure(1, len(MEASURES), (4.2 * len(MEASURES), 3.4))
    for label, (monitor_csv, steps_csv) in runs.items():
        rows, losses = _rows(monitor_csv), epoch_losses(steps_csv)
        if not rows:
            raise SystemExit(f"plot_monitor: {label} has no monitor rows (pretrain.monitor.enabled was false)")
        for ax, key in zip(axes[0], MEASURES, strict=True):
            if key == "loss":
                ax.plot(list(losses), list(losses.values()), marker=".", label=label)
            else:
                ax.plot([r["epoch"] for r in rows], [r[key] for r in rows], marker=".", label=label)
    for ax, title in zip(axes[0], MEASURES.values(), strict=True):
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=8)
    out = save_figure(fig, ROOT / args.out if not Path(args.out).is_absolute() else args.out)
    print(f"plot_monitor: wrote {out}")


if __name__ == "__main__":
    main()
