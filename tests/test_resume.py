"""finetune and seg_train survive kill -9: killed at a random moment inside an epoch (the whole process group, as a
lost node would be) and rerun by `dvc repro`, which deletes their outputs first, they end with the metrics and the
weights of an uninterrupted run (pipeline.resume)."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from ijepa.checkpoint import read_checkpoint

from .test_data import mini_fashion_mnist
from .test_pipeline import BIN, TEST_OVERLAY, copy_project, git_init, sh
from .test_stages import official_checkpoint

pytestmark = [pytest.mark.slow, pytest.mark.process]

EPOCHS = 5
STAGES = {"finetune": "finetune", "seg_train": "seg_train-pretrained"}  # stage: the resume file the kill waits for


def project(root: Path) -> Path:
    """The debug chain on a miniature Fashion-MNIST with an encoder checkpoint at pretrain's output and
    prepare + seg_prepare run: what finetune and seg_train read."""
    copy_project(root)
    mini_fashion_mnist(root / "fixtures" / "fm", n_train=120, n_test=40)
    (root / "params/experiment/test.yaml").write_text(TEST_OVERLAY)
    cfg = root / "params/config.yaml"
    cfg.write_text(cfg.read_text().replace("  - experiment: null", "  - experiment: test"))
    sh(root, sys.executable, "scripts/compose_params.py")
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
