"""Pretraining health monitors: RankMe and feature spread by their definitions, no effect on training, the
pretrain stage's monitor log and plots, and the collapse warning / stop."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from ijepa.models.vit import VisionTransformer
from ijepa.monitor import CollapseError, HealthMonitor, feature_spread, rankme
from ijepa.pretrain import pretrain
from pipeline.params import ParamError
from pipeline.stage import run_stage
from stages import prepare
from stages import pretrain as pretrain_stage

from .conftest import step_batches, tiny_collator
from .helpers import shard_project

ROOT = Path(__file__).resolve().parent.parent


def test_rankme_counts_equally_used_directions():
    basis = torch.linalg.qr(torch.randn(64, 64, dtype=torch.float64))[0]
    for r in (1, 5, 32):
        coeffs = torch.zeros(256, 64, dtype=torch.float64)
        coeffs[:, :r] = torch.linalg.qr(torch.randn(256, r, dtype=torch.float64))[0]  # equal singular values
        assert rankme(coeffs @ basis.T) == pytest.approx(r, rel=1e-3)  # eps adds ~1e-4
    unequal = torch.randn(500, 8, dtype=torch.float64) * torch.tensor([10.0, 1, 1, 1, 1, 1, 1, 1])
    assert 1 < rankme(unequal) < 8  # one dominant direction lowers the effective rank


def test_feature_spread_is_zero_for_collapse_and_near_one_when_spread():
    assert feature_spread(torch.ones(100, 32) * torch.randn(1, 32)) == pytest.approx(0.0, abs=1e-6)
    assert feature_spread(torch.randn(4000, 256)) == pytest.approx(1.0, abs=0.02)


def _monitor(n_bank: int = 40, n_query: int = 12) -> HealthMonitor:
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n_bank + n_query, 32, 32, 3), dtype=torch.uint8, generator=g)
    labels = torch.arange(n_bank + n_query) % 4
    prep = lambda x, device: x.permute(0, 3, 1, 2).float().div(255).to(device)  # noqa: E731
    return HealthMonitor(
        images[:n_bank], labels[:n_bank], images[n_bank:], labels[n_bank:],
        num_classes=4, prepare=prep, device=torch.device("cpu"), k=5, batch_size=16,
    )  # fmt: skip


def test_monitor_draws_no_random_numbers_and_restores_the_mode():
    enc = VisionTransformer(img_size=32, patch_size=4, embed_dim=48, depth=1, num_heads=3).train()
    mon = _monitor()
    state = torch.get_rng_state()
    values = mon(enc)
    assert torch.equal(torch.get_rng_state(), state) and enc.training
    assert set(values) == {"rankme", "feature_spread", "knn_top1"} and 1 <= values["rankme"] <= 48
    assert mon(enc.eval()) == values and not enc.training  # deterministic, mode kept


def test_monitoring_leaves_training_bit_identical_and_runs_on_schedule(tmp_path, tiny_spec, tiny_optim):
    make = step_batches(tiny_collator())
    cpu = torch.device("cpu")
    common = dict(model=tiny_spec, optim=tiny_optim, ipe=3, batch_size=4, make_batches=make, device=cpu)
    plain = []
    pretrain(**common, out_dir=tmp_path / "plain", on_step=lambda log: plain.append(log.loss))
    mon, seen, losses = _monitor(), [], []

    def monitor(encoder, step):
        seen.append((step, mon(encoder)["rankme"]))

    pretrain(
        **common, out_dir=tmp_path / "mon", on_step=lambda log: losses.append(log.loss),
        monitor=monitor, monitor_every=2,
    )  # fmt: skip
    assert losses == plain  # bit for bit: the monitor touches neither the weights nor the RNG
    assert [s for s, _ in seen] == [0, 2, 3, 4, 6, 8, 9]  # before training, every 2 steps, each epoch end (3)
    assert all(1 <= r <= 192 for _, r in seen)
    seen.clear()
    pretrain(**common, out_dir=tmp_path / "mon", monitor=monitor, monitor_every=2)  # finished: nothing to resume
    assert seen == []


@pytest.fixture(scope="module")
def stage_project(tmp_path_factory):
    return shard_project(tmp_path_factory.mktemp("monitor") / "p", 1)


def test_pretrain_stage_logs_health_rows_metrics_and_plots(stage_project):
    root, params = stage_project
    params = yaml.safe_load(yaml.safe_dump(params))
    params["pretrain"]["monitor"] |= {"every": 10, "bank": 60, "queries": 15, "k": 5}
    metrics = run_stage("pretrain", pretrain_stage.run, pretrain_stage.SECTIONS, root=root, params=params)
    with open(root / "metrics/pretrain_monitor.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == [0, 10, 20, 22]  # 180 images / batch 8 = 22 steps in the epoch
    assert float(rows[-1]["epoch"]) == 1.0
    saved = json.loads((root / "metrics/pretrain.json").read_text())
    assert saved["final_rankme"] == float(rows[-1]["rankme"]) and saved["min_rankme"] <= saved["final_rankme"]
    assert 0 <= saved["final_knn_top1"] <= 1 and metrics["monitor_seconds"] > 0
    assert (root / "plots/pretrain_monitor.png").stat().st_size > 1000


@pytest.mark.process
def test_collapse_floor_warns_or_stops_with_one_line(stage_project, tmp_path):
    root, params = stage_project
    params = yaml.safe_load(yaml.safe_dump(params))
    params["pretrain"]["epochs"] = 2  # new params: the checkpoint of the other test is set aside
    params["pretrain"]["monitor"]["every"] = 5
    params["pretrain"]["monitor"] |= {
        "bank": 60,
        "queries": 15,
        "k": 5,
        "min_rank": 1000.0,
        "grace_epochs": 0,
        "stop_on_collapse": True,
    }
    with pytest.raises(
        CollapseError, match=r"RankMe \S+ at step 5 \(epoch 0\.23\) is below pretrain\.monitor\.min_rank"
    ):
        run_stage("pretrain", pretrain_stage.run, pretrain_stage.SECTIONS, root=root, params=params)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run(
        [sys.executable, "-m", "stages.pretrain"], cwd=root, env=env, capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("pretrain: error: RankMe")
    assert "stop_on_collapse" in r.stderr
    params["pretrain"]["monitor"] |= {"stop_on_collapse": False, "grace_epochs": 1}  # warn after epoch 1, go on
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    r = subprocess.run(
        [sys.executable, "-m", "stages.pretrain"], cwd=root, env=env, capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stderr.count("pretrain: warning: RankMe") == 6  # steps 22, 25, 30, 35, 40 and 44
    assert "at step 22 (epoch 1.00)" in r.stderr and "at step 44 (epoch 2.00)" in r.stderr
    assert "at step 20 " not in r.stderr  # within the grace epoch


def test_the_monitor_hook_writes_rows_warns_after_the_grace_and_plots(tmp_path, capsys):
    """pipeline.monitoring: rows to the step CSV and the tracker on rank 0, the floor's warning only after the
    grace epochs and only on rank 0 (others measure silently), and a figure that says when nothing was measured."""
    from pipeline.monitoring import COLUMNS, MonitorHook, health_metrics, plot_health
    from pipeline.outputs import StepCSV
    from pipeline.params import MonitorParams
    from pipeline.schema import parse

    class Tracker:
        def __init__(self):
            self.logged = []

        def log_metrics(self, values, step):
            self.logged.append((step, values))

    values = {"rankme": 2.0, "feature_spread": 0.5, "knn_top1": 0.3}
    monitor = yaml.safe_load((ROOT / "params.yaml").read_text())["pretrain"]["monitor"]
    mon = parse(MonitorParams, monitor | {"min_rank": 5.0, "grace_epochs": 1.0}, "pretrain.monitor")
    tracker, rows = Tracker(), StepCSV(tmp_path / "m.csv", COLUMNS)
    hook = MonitorHook(lambda encoder: values, mon, ipe=10, csv=rows, tracker=tracker)
    for step in (0, 5, 10, 20):
        hook(None, step)
    err = capsys.readouterr().err
    assert err.count("pretrain: warning: RankMe 2.00") == 2 and "at step 10 (epoch 1.00)" in err
    assert [s for s, _ in tracker.logged] == [0, 5, 10, 20] and tracker.logged[0][1]["monitor_rankme"] == 2.0
    assert health_metrics(rows.read()) == {"final_rankme": 2.0, "final_feature_spread": 0.5, "final_knn_top1": 0.3,
                                           "min_rankme": 2.0} and health_metrics([]) == {}  # fmt: skip
    MonitorHook(lambda encoder: values, mon, ipe=10, csv=None, tracker=None)(None, 20)  # another rank
    assert capsys.readouterr().err == ""
    assert plot_health([], None, tmp_path / "none.png").stat().st_size > 1000


def test_pretraining_reads_the_unlabeled_split_that_prepare_adds(tmp_path):
    """prepare.unlabeled_per_class writes the images past max_per_class as `unlabeled`; pretrain.splits adds them
    to its epochs (one epoch = every image of both splits), and names a split the shards lack."""
    root, params = shard_project(tmp_path / "p", 1)
    params["prepare"] |= {"max_per_class": 12, "unlabeled_per_class": None}
    params["pretrain"] |= {"splits": ["train", "nope"], "monitor": params["pretrain"]["monitor"] | {"enabled": False}}
    shards = run_stage("prepare", prepare.run, prepare.SECTIONS, root=root, params=params)
    assert (shards["train_images"], shards["val_images"], shards["unlabeled_images"]) == (110, 10, 80)
    with pytest.raises(ParamError, match=r"pretrain\.splits: \['nope'\] not in .*unlabeled"):
        run_stage("pretrain", pretrain_stage.run, pretrain_stage.SECTIONS, root=root, params=params)
    params["pretrain"]["splits"] = ["train", "unlabeled"]
    metrics = run_stage("pretrain", pretrain_stage.run, pretrain_stage.SECTIONS, root=root, params=params)
    assert metrics["ipe"] == metrics["steps"] == (110 + 80) // 8
