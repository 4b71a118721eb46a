"""Stage outputs: metrics JSON, per-step CSV for DVC plots, PNG plots for people and MLflow."""

from __future__ import annotations

import csv
import json
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path


def stored_path(path: str | Path, root: str | Path) -> str:
    """How an output records a path: relative to the repository ``root`` (posix) when it lies inside it, so a
    clone in another folder writes the same bytes; absolute otherwise (an official checkpoint elsewhere)."""
    path, root = Path(path).absolute(), Path(root).absolute()
    return path.relative_to(root).as_posix() if path.is_relative_to(root) else str(path)


def write_json(path: str | Path, obj) -> Path:
    """Write JSON atomically (temporary file + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)
    return path


class StepCSV:
    """Appends one row per step; rows at or after ``truncate_from`` are dropped first (resumed runs)."""

    def __init__(self, path: str | Path, columns: Sequence[str], truncate_from: int | None = None):
        self.path, self.columns = Path(path), list(columns)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        rows = []
        if truncate_from is not None and self.path.exists():
            with open(self.path, newline="") as f:
                rows = [r for r in csv.DictReader(f) if int(r["step"]) < truncate_from]
        with open(self.path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=self.columns)
            w.writeheader()
            w.writerows(rows)

    def write(self, row: Mapping) -> None:
        with open(self.path, "a", newline="") as f:
            csv.DictWriter(f, fieldnames=self.columns).writerow({k: row[k] for k in self.columns})

    def read(self) -> list[dict]:
        return read_rows(self.path)


def read_rows(path: str | Path) -> list[dict]:
    """The rows of a step log as floats (none when the file does not exist)."""
    if not Path(path).exists():
        return []
    with open(path, newline="") as f:
        return [{k: float(v) for k, v in r.items()} for r in csv.DictReader(f)]


def plot_series(rows: Sequence[Mapping], x: str, ys: Sequence[str], path: str | Path, title: str) -> Path:
    """One panel per series against ``x``, saved as PNG."""
    fig, axes = new_figure(1, len(ys), (4.2 * len(ys), 3.2))
    xs = [r[x] for r in rows]
    for ax, y in zip(axes[0], ys, strict=True):
        ax.plot(xs, [r[y] for r in rows], lw=1.2)
        ax.set_xlabel(x)
        ax.set_title(y)
        ax.grid(alpha=0.3)
    return save_figure(fig, path, title)


ENCODER_COLORS = {"pretrained": "tab:blue", "random_init": "tab:gray", "pixels": "tab:orange"}  # probe plots


def text_figure(path: str | Path, text: str) -> Path:
    """A PNG holding one line of text: the output of a plot whose stage had nothing to draw (dvc.yaml
    lists the file either way)."""
    fig, axes = new_figure(1, 1, (5, 1.5))
    axes[0, 0].axis("off")
    axes[0, 0].text(0.5, 0.5, text, ha="center")
    return save_figure(fig, path)


def new_figure(rows: int, cols: int, size: tuple[float, float]):
    """(fig, axes 2-D array) with the non-interactive backend (stages run headless)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(rows, cols, figsize=size, squeeze=False)


def save_figure(
    fig, path: str | Path, title: str | None = None, legend: Sequence[tuple[str, Sequence[int]]] | None = None
) -> Path:
    """Title, tight layout, PNG at ``path`` (folders created), figure closed.

    Args:
        legend: (name, RGB 0-255 colour) per class, drawn as a colour key under the panels: every plot that
            encodes classes by colour carries one.
    """
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    extra = [fig.suptitle(title)] if title else []
    fig.tight_layout()
    if legend:
        handles = [Patch(facecolor=[c / 255 for c in rgb], edgecolor="0.3", label=name) for name, rgb in legend]
        extra.append(
            fig.legend(
                handles=handles, loc="upper center", bbox_to_anchor=(0.5, 0.0), ncol=min(len(handles), 6),
                fontsize=8, frameon=False,
            )
        )  # fmt: skip
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if legend:  # the key lies outside the axes: save the bounding box of everything drawn
        fig.savefig(path, dpi=110, bbox_extra_artists=extra, bbox_inches="tight")
    else:
        fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
