"""finetune and seg_train survive kill -9: killed at a random moment inside an epoch (the whole process group, as a
lost node would be) and rerun by `dvc repro`, which deletes their outputs first, they end with the metrics and the
weights of an uninterrupted run (pipeline.resume)."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
import yaml

from ijepa.checkpoint import read_checkpoint
from pipeline import preemption
from pipeline.resume import EpochState, folder_key, run_key
from pipeline.stage import run_stage
from stages import finetune, prepare, seg_prepare, seg_train

from .helpers import BIN, ROOT, debug_project, git_init, mini_fashion_mnist, official_checkpoint, sh

EPOCHS = 5
STAGES = {"finetune": "finetune", "seg_train": "seg_train-pretrained"}  # stage: the resume file the kill waits for


def project(root: Path) -> Path:
    """For `dvc repro`: the debug chain on a miniature Fashion-MNIST with an encoder checkpoint at pretrain's output and
    prepare + seg_prepare run: what finetune and seg_train read."""
    debug_project(root)
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["tracking"]["enabled"] = False
    params["finetune"] |= {"epochs": EPOCHS, "warmup_epochs": 1, "log_model": False}
    params["seg_train"] |= {"epochs": EPOCHS, "log_model": False}
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    git_init(root)
    sh(root, "dvc", "repro", "--single-item", "prepare", "seg_prepare")
    (root / "models/pretrain").mkdir(parents=True)
    official_checkpoint(root / "models/pretrain/jepa-latest.pth.tar")
    return root


def epochs_done(path: Path) -> int:
    return read_checkpoint(path)["state"]["epochs_done"] if path.exists() else 0  # written atomically


def weights(root: Path, stage: str) -> dict[str, torch.Tensor]:
    files = ["models/finetune/classifier.pth"] if stage == "finetune" else ["models/seg/pretrained.pth",
                                                                          "models/seg/random_init.pth"]  # fmt: skip
    return {f"{f}:{k}": t for f in files for k, t in read_checkpoint(root / f)["model"].items()}


@pytest.mark.slow
@pytest.mark.process
def test_finetune_and_seg_train_killed_mid_epoch_then_rerun_by_dvc_end_as_uninterrupted_runs(tmp_path):
    ref, cut = project(tmp_path / "ref"), project(tmp_path / "cut")
    sh(ref, "dvc", "repro", "--single-item", *STAGES)
    rng = random.Random()
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}"}
    env.pop("PYTHONPATH", None)
    for stage, state_name in STAGES.items():
        state = cut / "models/resume" / f"{state_name}.pt"
        proc = subprocess.Popen(
            ["dvc", "repro", "--single-item", stage], cwd=cut, env=env, start_new_session=True,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        try:  # the length of an epoch, from the moments the first two were saved; then a random moment after
            marks, deadline = [], time.monotonic() + 300
            while len(marks) < 2:
                assert proc.poll() is None and time.monotonic() < deadline, f"{stage} ended before its 2nd epoch"
                if epochs_done(state) > len(marks):
                    marks.append(time.monotonic())
                time.sleep(0.01)
            when = rng.uniform(0.05, 0.8) * (marks[1] - marks[0])
            time.sleep(when)  # on a loaded machine epochs vary: a later epoch than the 3rd is as good a moment
            at = epochs_done(state)
            assert proc.poll() is None and 2 <= at < EPOCHS, f"{stage} was not running its epoch 3 to {EPOCHS}"
        finally:
            os.killpg(proc.pid, signal.SIGKILL)  # dvc, the stage and any loader workers
            proc.wait()
        assert not (cut / f"metrics/{stage}.json").exists()
        again = sh(cut, "dvc", "repro", "--single-item", stage)  # DVC deletes the stage's outputs, then reruns it
        assert f"resuming from {state}" in again.stdout, again.stdout[-2000:]
        got = json.loads((cut / f"metrics/{stage}.json").read_text())
        assert got == json.loads((ref / f"metrics/{stage}.json").read_text()), (stage, at, when)
        expected = weights(ref, stage)
        for name, t in weights(cut, stage).items():
            assert torch.equal(t, expected[name]), (stage, name, at, when)
        assert not list((cut / "models/resume").glob(f"{stage}*")), "a finished run leaves no resume file"


def stage_project(root: Path) -> tuple[Path, dict]:
    """In-process stage runs: real shards and segmentation folders, an encoder checkpoint, no tracking."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    fm = mini_fashion_mnist(root / "fm", 120, 20)
    params["prepare"] |= {"source": params["prepare"]["source"] | {"dir": str(fm)}, "shard_size": 64}
    params["tracking"]["enabled"] = False
    ckpt = str(official_checkpoint(root / "encoder.pth.tar"))
    params["finetune"] |= {"checkpoint": ckpt, "epochs": 3, "batch_size": 16, "num_workers": 0, "log_model": False}
    params["finetune"] |= {"warmup_epochs": 1, "mixup": 0.8, "cutmix": 1.0, "model_ema": True, "ema_decay": 0.9}
    params["seg_prepare"] |= {"fashion_mnist_dir": str(fm), "train_images": 16, "val_images": 6}
    params["seg_train"] |= {"checkpoint": ckpt, "epochs": 3, "batch_size": 8, "num_workers": 0, "log_model": False}
    run_stage("prepare", prepare.run, prepare.SECTIONS, root=root, params=params)
    run_stage("seg_prepare", seg_prepare.run, seg_prepare.SECTIONS, root=root, params=params)
    return root, params


def untimed(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if k != "stage_seconds"}


@pytest.mark.slow
def test_preempted_finetune_and_seg_train_resume_to_the_uninterrupted_result(tmp_path, monkeypatch, capsys):
    """In one process: each stage stopped by a preemption request after its first epoch (the flag USR2 sets), then
    run again, ends with the metrics and weights of an uninterrupted run (EMA, mixing, best-so-far and the random
    generators included); a saved state under other params is set aside, not resumed."""
    ref, params = stage_project(tmp_path / "ref")
    cut, _ = stage_project(tmp_path / "cut")
    for stage in (finetune, seg_train):
        name = stage.__name__.rsplit(".", 1)[-1]
        monkeypatch.setattr(preemption, "requested", lambda: False)
        expected = untimed(run_stage(name, stage.run, stage.SECTIONS, root=ref, params=params))
        monkeypatch.setattr(preemption, "requested", lambda: True)  # asked after every epoch: stops after the 1st
        assert untimed(run_stage(name, stage.run, stage.SECTIONS, root=cut, params=params)) == {"stopped": True}
        saved = sorted(p.name for p in (cut / "models/resume").glob(f"{name}*"))
        assert saved == (["finetune.best.pth", "finetune.pt"] if name == "finetune" else ["seg_train-pretrained.pt"])
        monkeypatch.setattr(preemption, "requested", lambda: False)
        capsys.readouterr()
        assert untimed(run_stage(name, stage.run, stage.SECTIONS, root=cut, params=params)) == expected
        assert f"{name}: resuming from" in capsys.readouterr().out
        for key, t in weights(ref, name).items():
            assert torch.equal(t, weights(cut, name)[key]), key
        assert not list((cut / "models/resume").glob(f"{name}*"))
    # a state saved under other params: set aside with one line, training starts afresh
    monkeypatch.setattr(preemption, "requested", lambda: True)
    run_stage("finetune", finetune.run, finetune.SECTIONS, root=cut, params=params)
    other = yaml.safe_load(yaml.safe_dump(params))
    other["finetune"]["blr"] *= 2
    monkeypatch.setattr(preemption, "requested", lambda: False)
    capsys.readouterr()
    run_stage("finetune", finetune.run, finetune.SECTIONS, root=cut, params=other)
    out = capsys.readouterr().out
    assert "was saved under other params, data or checkpoint; moved to" in out and "resuming" not in out
    assert len(list((cut / "models/resume").glob("finetune.pt.stale-*"))) == 1


def test_run_keys_and_state_files(tmp_path):
    params = {"seed": 0, "finetune": {"blr": 1.0, "log_model": True}}
    key = run_key(params, ["seed", "finetune"], exclude={"finetune": ["log_model"]}, world_size=1)
    quiet = {"seed": 0, "finetune": {"blr": 1.0, "log_model": False}}
    assert run_key(quiet, ["seed", "finetune"], exclude={"finetune": ["log_model"]}, world_size=1) == key
    assert run_key(params, ["seed", "finetune"], exclude={"finetune": ["log_model"]}, world_size=2) != key
    (tmp_path / "d").mkdir()
    (tmp_path / "d/a.png").write_bytes(b"x")
    before = folder_key(tmp_path / "d")
    (tmp_path / "d/a.png").write_bytes(b"xy")
    assert folder_key(tmp_path / "d") != before
    state = EpochState(tmp_path, "s", key)
    assert state.load() is None and state.companion("best.pth").name == "s.best.pth"
    state.save({"epochs_done": 1})
    assert EpochState(tmp_path, "s", key).load() == {"epochs_done": 1}
    assert EpochState(tmp_path, "s", "other").load() is None and not state.path.exists()  # set aside
    state.save({"epochs_done": 2})
    state.finish()
    assert not state.path.exists() and len(list(state.path.parent.glob("s.pt.stale-*"))) == 1


def test_the_epoch_loop_resumes_at_the_first_epoch_not_done_and_draws_what_an_uninterrupted_run_draws(tmp_path):
    """ijepa.epochs.EpochLoop, the loop finetuning, segmentation and the streaming probe share: stopped at an
    epoch's end (never after the last), resumed from EpochState at the next epoch with the generators as they
    were, so the draws after the stop equal an uninterrupted run's."""
    from ijepa.epochs import EpochLoop

    def run(state, stop_after=None):
        torch.manual_seed(0)
        loop = EpochLoop(4, state, should_stop=lambda: stop_after is not None and done[-1] == stop_after)
        done, draws = [], list(loop.saved["draws"]) if loop.saved else []
        for epoch in loop:
            draws.append(float(torch.rand(1)))
            done.append(epoch)
            loop.end(epoch, {"draws": draws})
        return loop, done, draws

    whole, whole_done, whole_draws = run(None)
    assert whole_done == [0, 1, 2, 3] and not whole.stopped
    first, done, _ = run(EpochState(tmp_path, "loop", "k"), stop_after=1)
    assert first.stopped and done == [0, 1]
    again, done, draws = run(EpochState(tmp_path, "loop", "k"))
    assert again.start == 2 and done == [2, 3] and draws == whole_draws and not again.stopped
    last, done, _ = run(EpochState(tmp_path, "last", "k"), stop_after=3)
    assert done == [0, 1, 2, 3] and not last.stopped  # the last epoch never counts as stopped
