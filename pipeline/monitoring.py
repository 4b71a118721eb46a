"""The pretraining health monitor wired to a stage: its images from the shards, its rows in a DVC plot CSV and in
MLflow, the collapse floor (a warning, or a stop), and its plot."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from tqdm import tqdm

from ijepa.data import eval_transform, shard_urls
from ijepa.data.memory import DecodedSplit, decode_split
from ijepa.data.transforms import Normalize, build_batch
from ijepa.monitor import CollapseError, HealthMonitor

from .outputs import StepCSV, plot_series, text_figure
from .params import MonitorParams, ParamError

COLUMNS = ["step", "epoch", "rankme", "feature_spread", "knn_top1"]


def build_health_monitor(shards: Path, manifest: dict, mon: MonitorParams, crop: int, device, bf16: bool):
    """The first ``mon.bank`` training images and ``mon.queries`` validation images, centre-cropped once
    (the train split continues after the bank when there is no validation split)."""
    transform, urls = eval_transform(crop), lambda split: shard_urls(shards, split)
    has_val = "val" in manifest["splits"]
    train = decode_split(urls("train"), setting="pretrain.monitor", limit=mon.bank + (0 if has_val else mon.queries))
    n = min(mon.bank, len(train))
    bank = DecodedSplit(train.images[:n], train.labels[:n], train.keys[:n])
    if has_val:
        queries = decode_split(urls("val"), setting="pretrain.monitor", limit=mon.queries)
    else:
        queries = DecodedSplit(train.images[n:], train.labels[n:], train.keys[n:])
        if not len(queries):
            raise ParamError(
                f"pretrain.monitor.bank: {mon.bank} takes every training image and there is no validation split "
                "left for the queries; lower it"
            )
    return HealthMonitor(
        build_batch(bank.images, transform),
        bank.labels,
        build_batch(queries.images, transform),
        queries.labels,
        num_classes=len(manifest["classes"]),
        prepare=Normalize(),
        device=device,
        bf16=bf16,
        k=mon.k,
    )


class MonitorHook:
    """``pretrain``'s ``monitor`` callback: measures the target encoder, writes a row (rank 0: ``csv`` and
    ``tracker``), and applies ``mon.min_rank`` after ``mon.grace_epochs`` (a warning, or a ``CollapseError``
    on every rank: the values are the same on each)."""

    def __init__(self, health: HealthMonitor, mon: MonitorParams, ipe: int, csv: StepCSV | None, tracker):
        self.health, self.mon, self.ipe, self.csv, self.tracker = health, mon, ipe, csv, tracker
        self.seconds = 0.0  # spent measuring, by this invocation

    def __call__(self, encoder, step: int) -> None:
        t = time.perf_counter()
        values = self.health(encoder)
        self.seconds += time.perf_counter() - t
        if self.csv is not None:
            self.csv.write({"step": step, "epoch": round(step / self.ipe, 4), **values})
            self.tracker.log_metrics({f"monitor_{k}": v for k, v in values.items()}, step=step)
        mon = self.mon
        # an encoder starts with a low rank (random init: about 3 on the demo): the floor applies after a grace
        if step and step >= mon.grace_epochs * self.ipe and mon.min_rank and values["rankme"] < mon.min_rank:
            msg = (
                f"RankMe {values['rankme']:.2f} at step {step} (epoch {step / self.ipe:.2f}) is below "
                f"pretrain.monitor.min_rank={mon.min_rank:g}: the target encoder's features are collapsing"
            )
            if mon.stop_on_collapse:
                raise CollapseError(f"{msg}; stopped (pretrain.monitor.stop_on_collapse)")
            if self.csv is not None:
                tqdm.write(f"pretrain: warning: {msg}", file=sys.stderr)


def health_metrics(rows: list[dict]) -> dict:
    """The last row's values as ``final_<name>`` and the lowest RankMe, for the stage's metrics."""
    if not rows:
        return {}
    return {f"final_{k}": rows[-1][k] for k in COLUMNS[2:]} | {"min_rankme": min(r["rankme"] for r in rows)}


def plot_health(rows: list[dict], health: HealthMonitor | None, path: Path) -> Path:
    if rows:
        title = f"target-encoder health ({len(health.bank)} bank, {len(health.queries)} query images)"
        return plot_series(rows, "step", COLUMNS[2:], path, title)
    return text_figure(path, "no health monitor rows (pretrain.monitor.enabled: false)")
