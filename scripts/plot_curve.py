"""The compute curve of docs/results.md: each protocol's test result against pretraining steps (log scale), with
the random-init and raw-pixel results of the same protocol as flat lines, and the health monitor's end values.

Reads the experiments a grid ran (``make study GRID=scripts/study_curve.yaml ARGS=--in-place``), those of
``dvc exp show`` and those of the study's committed record (``scripts/study_curve.runs.json``), groups them by
variant (mean and sample sd over the variant's seeds, error bars where there are several), prints the curve's
table, the gaps the demo's targets name and draws the figure:

    python scripts/plot_curve.py scripts/study_curve.yaml [--out docs/compute_curve.png] [-A]

A baseline does not depend on pretraining, only on the seed: every length of one seed draws the same
random-init encoder and the same label subsets and fits the same pixels. So its line is the mean over the
study's seeds (one value per seed, however many lengths ran at it), its band one sd. Seeds move the baselines
by more than they move the pretrained encoder (a 1% subset, a random-init draw), so a gap is taken within one
run, pretrained minus baseline of the same seed, and then averaged over the variant's seeds.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from pipeline.outputs import new_figure, save_figure  # noqa: E402
from scripts.experiments import dvc_command, exp_show, finished, mean_sd, record_path, study_run, values, with_record  # noqa: E402
from scripts.recipe_study import load_grid  # noqa: E402

PANELS = [  # (title, pretrained metric, {baseline label: metric})
    ("linear probe", "linear", {"random init": "linear rand", "pixels": "linear pixels"}),
    ("k-NN (k = 10)", "k-NN", {"random init": "k-NN rand"}),
    ("attentive probe", "attentive", {"random init": "attentive rand", "pixels": "attentive pixels"}),
    ("1% of the labels", "1%", {"random init": "1% rand", "pixels": "1% pixels"}),
    ("1 image per class", "1-shot", {"random init": "1-shot rand", "pixels": "1-shot pixels"}),
    ("finetuning", "finetune", {"random init": "finetune rand"}),
    ("segmentation (mIoU)", "seg mIoU", {"random init": "seg rand"}),
]
HEALTH = [("RankMe (end)", "RankMe"), ("online k-NN (end)", "online k-NN")]
GAPS = [  # the demo's targets: (pretrained, baseline) of one run
    ("linear", "linear pixels"),
    ("1%", "1% pixels"),
    ("10%", "10% pixels"),
    ("attentive", "attentive rand"),
    ("seg mIoU", "seg rand"),
]
METRICS = sorted(
    {m for _, p, b in PANELS for m in (p, *b.values())}
    | {m for _, m in HEALTH}
    | {m for g in GAPS for m in g}
    | {"steps"}
)


def rows_by_variant(grid: dict, show: list[dict]) -> dict[str, list[dict]]:
    """variant -> one dict of METRICS and its ``seed`` per finished experiment ``<prefix>-<variant>-s<seed>``, in
    the grid's order of variants and by seed."""
    runs = [(study_run(name, grid["prefix"], grid["variants"]), rev) for name, rev in finished(show)]
    out = {}
    for variant in grid["variants"]:
        rows = [
            {**values(rev["data"], [(m, m) for m in METRICS]), "seed": run[1]}
            for run, rev in runs
            if run and run[0] == variant
        ]
        if rows:
            out[variant] = sorted(rows, key=lambda r: r["seed"])
    return out


def per_seed(rows: dict[str, list[dict]], metric: str) -> list[float]:
    """One value of a baseline per seed (the first run of the seed that has it)."""
    first = {}
    for r in (r for rs in rows.values() for r in rs):
        if r[metric] is not None:
            first.setdefault(r["seed"], r[metric])
    return list(first.values())


def gap(r: dict, pretrained: str, baseline: str) -> float | None:
    return None if r[pretrained] is None or r[baseline] is None else r[pretrained] - r[baseline]


def table(rows: dict[str, list[dict]]) -> str:
    columns = ["steps", *(m for _, m, _ in PANELS), *(m for _, m in HEALTH)]
    lines = ["| variant | seeds | " + " | ".join(columns) + " |", "|" + "---|" * (len(columns) + 2)]
    for variant, rs in rows.items():
        cells = [f"{statistics.mean(r['steps'] for r in rs):.0f}"]  # the same at every seed
        cells += [mean_sd([r[c] for r in rs]) for c in columns[1:]]
        lines.append(f"| {variant} | {len(rs)} | " + " | ".join(cells) + " |")
    base = sorted({m for _, _, b in PANELS for m in b.values()} | {b for _, b in GAPS})
    lines += ["", "| baseline (one value per seed) | seeds | mean +- sd |", "|---|---|---|"]
    lines += [f"| {m} | {len(v)} | {mean_sd(v)} |" for m, v in ((m, per_seed(rows, m)) for m in base)]
    gaps = " | ".join(f"{p} - {b}" for p, b in GAPS) + " |\n|" + "---|" * (len(GAPS) + 2)
    lines += ["", f"| variant | seeds | {gaps}"]
    for variant, rs in rows.items():
        cells = [mean_sd([gap(r, p, b) for r in rs]) for p, b in GAPS]
        lines.append(f"| {variant} | {len(rs)} | " + " | ".join(cells) + " |")
    lines += ["", f"| run | seed | {gaps}"]  # and each run's own gaps, to read a claim "at every seed" off
    for variant, rs in rows.items():
        for r in rs:
            lines.append(f"| {variant} | {r['seed']} | " + " | ".join(mean_sd([gap(r, p, b)]) for p, b in GAPS) + " |")
    return "\n".join(lines)


def plot(rows: dict[str, list[dict]], out: Path) -> Path:
    fig, axes = new_figure(3, 3, (13, 11))
    steps = [statistics.mean(r["steps"] for r in rs) for rs in rows.values()]
    for ax, (title, metric, baselines) in zip(axes.flat, [*PANELS, *((t, m, {}) for t, m in HEALTH)], strict=True):
        ys = [[r[metric] for r in rs if r[metric] is not None] for rs in rows.values()]
        mean = [statistics.mean(v) if v else float("nan") for v in ys]
        err = [statistics.stdev(v) if len(v) > 1 else 0.0 for v in ys]
        ax.errorbar(steps, mean, yerr=err, marker="o", capsize=4, color="tab:blue", label="I-JEPA")
        for (label, m), colour in zip(baselines.items(), ("tab:red", "tab:gray"), strict=False):
            vals = per_seed(rows, m)
            if not vals:
                continue
            mu, sd = statistics.mean(vals), statistics.stdev(vals) if len(vals) > 1 else 0.0
            ax.axhline(mu, color=colour, linestyle="--", label=label)
            ax.axhspan(mu - sd, mu + sd, color=colour, alpha=0.12)
        ax.set_xscale("log")
        ax.set_xticks(steps, [f"{s:,.0f}" for s in steps])
        ax.minorticks_off()
        ax.set_title(title)
        ax.set_xlabel("pretraining steps")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return save_figure(fig, out, title="Demo: test results against pretraining length (mean +- sd over seeds)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("grid", type=Path, help="the study's grid file (scripts/study_curve.yaml)")
    ap.add_argument("--out", type=Path, default=ROOT / "docs/compute_curve.png")
    ap.add_argument("-A", "--all-commits", action="store_true", help="experiments of every commit, not only HEAD's")
    args = ap.parse_args()
    grid = load_grid(args.grid)
    show = exp_show(dvc_command("activate the project's .venv"), args.all_commits)
    rows = rows_by_variant(grid, with_record(show, record_path(args.grid)))
    if not rows:
        sys.exit(f"no experiment of {args.grid} has run yet: make study GRID={args.grid} ARGS=--in-place")
    print(table(rows))
    print(f"\nwrote {plot(rows, args.out)}")


if __name__ == "__main__":
    main()
