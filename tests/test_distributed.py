"""Distributed pretraining: real 2-process gloo, a real submitit job that times out and requeues, real SLURM."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch
import torch.multiprocessing as mp
import yaml

from ijepa.checkpoint import load_checkpoint_meta, read_checkpoint
from ijepa.device import pick_device
from ijepa.distributed import DistEnv, all_reduce_mean, env_from_os, init_distributed, shutdown, wrap_ddp
from ijepa.pretrain import OptimSpec, pretrain
from pipeline import launch, stage
from pipeline.params import section
from pipeline.schema import ParamError
from stages import prepare
from stages import pretrain as pretrain_stage

from .conftest import TINY, step_batches, tiny_collator
from .helpers import free_port, shard_project, write_idx

ROOT = Path(__file__).resolve().parent.parent
FULL_BATCH, IPE = 8, 3
OPTIM = OptimSpec(epochs=2, warmup=1, start_lr=2e-4, lr=1e-3, bf16=False)


def _shared_batches(rank: int, world: int):
    """This rank's equal share of the full batches (masks drawn once for the full batch, then split)."""
    full = step_batches(tiny_collator(), batch=FULL_BATCH)
    share = FULL_BATCH // world

    def make(epoch: int, start: int):
        for imgs, enc, pred in full(epoch, start):
            sl = slice(rank * share, (rank + 1) * share)
            yield imgs[sl], [m[sl] for m in enc], [m[sl] for m in pred]

    return make


def _train(rank: int, world: int, out: Path, device: torch.device | None = None) -> list[float]:
    device = device or torch.device("cpu")
    losses: list[float] = []
    pretrain(
        model=TINY,
        optim=OPTIM,
        ipe=IPE,
        batch_size=FULL_BATCH // world,
        make_batches=_shared_batches(rank, world),
        out_dir=out,
        device=device,
        world_size=world,
        is_main=rank == 0,
        wrap=(lambda j: wrap_ddp(j, device)) if world > 1 else None,
        reduce_loss=all_reduce_mean if world > 1 else None,
        on_step=lambda log: losses.append(log.loss),
    )
    return losses


def _ddp_worker(rank: int, world: int, port: int, out: str, cuda: bool = False) -> None:
    os.environ |= {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    os.environ |= {"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank)}
    env = env_from_os()
    device = pick_device("cuda", rank) if cuda else torch.device("cpu")
    init_distributed(env, device)  # NCCL on CUDA, gloo on the CPU
    losses = _train(rank, world, Path(out), device)
    Path(out, f"losses-{rank}.json").write_text(json.dumps(losses))
    shutdown()


@pytest.mark.process
def test_two_gloo_ranks_equal_one_process_over_the_combined_batch(tmp_path):
    mp.spawn(_ddp_worker, args=(2, free_port(), str(tmp_path / "ddp")), nprocs=2, join=True)
    single = _train(0, 1, tmp_path / "single")
    ddp = [json.loads((tmp_path / f"ddp/losses-{r}.json").read_text()) for r in (0, 1)]
    assert len(single) == OPTIM.epochs * IPE
    assert ddp[0] == ddp[1]  # the all-reduced loss is what every rank logs
    torch.testing.assert_close(torch.tensor(ddp[0]), torch.tensor(single), rtol=1e-5, atol=1e-6)
    a = read_checkpoint(tmp_path / "ddp/jepa-latest.pth.tar")
    b = read_checkpoint(tmp_path / "single/jepa-latest.pth.tar")
    assert (a["world_size"], a["batch_size"], b["world_size"], b["batch_size"]) == (2, 4, 1, 8)
    for key in ("encoder", "predictor", "target_encoder"):
        for name, t in b[key].items():
            torch.testing.assert_close(a[key][name], t, rtol=1e-4, atol=1e-5, msg=f"{key}.{name}")


@pytest.mark.process
@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices")
def test_two_nccl_ranks_equal_one_gpu_over_the_combined_batch(tmp_path):
    mp.spawn(_ddp_worker, args=(2, free_port(), str(tmp_path / "ddp"), True), nprocs=2, join=True)
    single = _train(0, 1, tmp_path / "single", pick_device("cuda", 0))
    ddp = json.loads((tmp_path / "ddp/losses-0.json").read_text())
    torch.testing.assert_close(torch.tensor(ddp), torch.tensor(single), rtol=1e-3, atol=1e-4)
    a = read_checkpoint(tmp_path / "ddp/jepa-latest.pth.tar")
    b = read_checkpoint(tmp_path / "single/jepa-latest.pth.tar")
    for name, t in b["target_encoder"].items():
        torch.testing.assert_close(a["target_encoder"][name], t, rtol=1e-3, atol=1e-4, msg=name)


def test_stop_mid_epoch_then_resume_is_exact(tmp_path):
    """A preempted run saves at the step it stopped (mid-epoch) and the resumed run ends bit-identical."""
    make = _shared_batches(0, 1)
    common = dict(model=TINY, optim=OPTIM, ipe=IPE, batch_size=FULL_BATCH, device=torch.device("cpu"))
    ref = pretrain(**common, make_batches=make, out_dir=tmp_path / "ref")
    steps: list[int] = []
    first = pretrain(
        **common,
        make_batches=make,
        out_dir=tmp_path / "cut",
        on_step=lambda log: steps.append(log.step),
        should_stop=lambda: len(steps) == IPE + 1,  # one step into the second epoch
    )
    assert first["stopped"] and first["step"] == IPE + 1
    assert load_checkpoint_meta(tmp_path / "cut/jepa-latest.pth.tar")["step"] == IPE + 1
    second = pretrain(**common, make_batches=make, out_dir=tmp_path / "cut", on_step=lambda log: steps.append(log.step))
    assert not second["stopped"] and steps == list(range(OPTIM.epochs * IPE)) and ref["step"] == second["step"]
    a, b = read_checkpoint(tmp_path / "ref/jepa-latest.pth.tar"), read_checkpoint(tmp_path / "cut/jepa-latest.pth.tar")
    for key in ("encoder", "predictor", "target_encoder"):
        for name, t in a[key].items():
            assert torch.equal(t, b[key][name]), f"{key}.{name}"
    assert a["opt"]["state"].keys() == b["opt"]["state"].keys()


def test_env_and_launcher_errors(monkeypatch, tmp_path):
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ValueError, match="RANK=2"):
        env_from_os()
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    with pytest.raises(RuntimeError, match="MASTER_ADDR"):
        init_distributed(DistEnv(0, 2, 0), torch.device("cpu"))
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    lp = section(params, "launcher")
    with pytest.raises(ParamError, match="launcher.kind: inline runs in the stage's process"):
        launch.make_executor(lp, tmp_path / "logs")
    with pytest.raises(ParamError, match="launcher.nodes: 2 with launcher.kind=local; local runs have one node"):
        launch.make_executor(dataclasses.replace(lp, kind="local", nodes=2), tmp_path / "logs")
    with pytest.raises(ParamError, match="launcher.nodes"):
        section({"launcher": {**params["launcher"], "nodes": 0}}, "launcher")
    # inline, the params must say one process (torchrun, which sets WORLD_SIZE, brings its own ranks)
    root = tmp_path / "p"
    root.mkdir()
    (root / "params.yaml").write_text(yaml.safe_dump(params | {"launcher": params["launcher"] | {"tasks_per_node": 2}}))
    assert stage.launched("pretrain", pretrain_stage.SECTIONS, root) is None  # WORLD_SIZE=2 above: torchrun
    monkeypatch.delenv("WORLD_SIZE")
    with pytest.raises(ParamError, match=r"launcher.tasks_per_node: launcher.kind=inline runs one process, but .* = 2"):
        stage.launched("pretrain", pretrain_stage.SECTIONS, root)
    assert stage.launched("knn", ("knn",), root) is None  # a one-process stage ignores the launcher


# -- the pretrain stage as a submitit job -------------------------------------------------------------


def _weights(root: Path) -> dict:
    return read_checkpoint(root / "models/pretrain/jepa-latest.pth.tar")["target_encoder"]


def test_rerun_of_a_finished_pretrain_keeps_its_history_and_refuses_a_lost_one(tmp_path):
    """`dvc repro` after a code change re-enters a finished run: no step trained, the loss metrics and the run's
    own pace unchanged (its time is kept beside the checkpoint; the re-entry used to write a null speed)."""
    root, params = shard_project(tmp_path / "p", 1)
    first = stage.run_stage("pretrain", pretrain_stage.run, pretrain_stage.SECTIONS, root=root, params=params)
    timing = json.loads((root / "models/pretrain" / pretrain_stage.TIMING).read_text())
    again = stage.run_stage("pretrain", pretrain_stage.run, pretrain_stage.SECTIONS, root=root, params=params)
    assert first["images_per_second"] > 0 and timing["steps"] == first["steps"] and timing["seconds"] > 0
    for k in ("final_loss", "first_epoch_loss", "steps", "images_per_second", "monitor_seconds"):
        assert again[k] == first[k], k
    assert json.loads((root / "models/pretrain" / pretrain_stage.TIMING).read_text()) == timing  # not rewritten
    (root / "models/pretrain" / pretrain_stage.TIMING).write_text("{truncated")
    with pytest.raises(ValueError, match=r"timing\.json: not the JSON pretraining writes"):
        pretrain_stage._run_timing(root / "models/pretrain" / pretrain_stage.TIMING, "k", 1, 1, 1.0, 0.0)
    (root / "models/pretrain" / pretrain_stage.TIMING).write_text("null")  # JSON, but not the record
    with pytest.raises(ValueError, match=r"timing\.json: not the JSON pretraining writes \(a NoneType"):
        pretrain_stage._run_timing(root / "models/pretrain" / pretrain_stage.TIMING, "k", 1, 1, 1.0, 0.0)
    (root / "models/pretrain" / pretrain_stage.TIMING).write_text(json.dumps(timing))
    published, history = root / "metrics/pretrain_steps.csv", root / "models/pretrain/steps.csv"
    rows = published.read_text()
    assert history.read_text() == rows and len(rows.splitlines()) == 1 + first["steps"]
    published.unlink()  # what DVC does to a non-persistent output before it reruns the stage
    stage.run_stage("pretrain", pretrain_stage.run, pretrain_stage.SECTIONS, root=root, params=params)
    assert published.read_text() == rows  # the history beside the checkpoint, published again
    # a checkpoint whose folder holds no history (written by an earlier version) continues the published one
    history.unlink()
    (root / "models/pretrain/monitor.csv").unlink()
    again = stage.run_stage("pretrain", pretrain_stage.run, pretrain_stage.SECTIONS, root=root, params=params)
    assert history.read_text() == rows and again["final_loss"] == first["final_loss"]
    history.unlink()
    published.unlink()  # lost everywhere: refused, naming the file
    with pytest.raises(
        FileNotFoundError, match=rf"pretrain/steps\.csv holds 0 step rows but .* resumes at step {first['steps']}:"
    ):
        stage.run_stage("pretrain", pretrain_stage.run, pretrain_stage.SECTIONS, root=root, params=params)
    assert (root / "models/pretrain/jepa-latest.pth.tar").is_file()  # the finished run is left alone
    published.write_text(rows)  # restored as the error says: the refused run cut no log, so this one continues
    assert (
        stage.run_stage("pretrain", pretrain_stage.run, pretrain_stage.SECTIONS, root=root, params=params)["final_loss"]
        == first["final_loss"]
    )


def test_new_training_data_starts_afresh_instead_of_resuming(tmp_path):
    """Same params, other training images of the same count (so the same steps per epoch): the finished
    checkpoint is set aside and pretraining starts at step 0 (it used to count as finished and train nothing)."""
    root, params = shard_project(tmp_path / "p", 1)
    first = stage.run_stage("pretrain", pretrain_stage.run, pretrain_stage.SECTIONS, root=root, params=params)
    before = _weights(root)
    other = tmp_path / "other-fm"
    shutil.copytree(tmp_path / "p-fm", other)
    write_idx(other / "train-images-idx3-ubyte.gz", np.random.default_rng(1).integers(0, 255, (200, 28, 28)), 2051)
    params["prepare"]["source"]["dir"] = str(other)
    stage.run_stage("prepare", prepare.run, prepare.SECTIONS, root=root, params=params)
    again = stage.run_stage("pretrain", pretrain_stage.run, pretrain_stage.SECTIONS, root=root, params=params)
    assert again["images_per_second"] is not None and again["steps"] == first["steps"]
    stale = list((root / "models/resume").glob("pretrain.stale-*"))
    assert len(stale) == 1 and (stale[0] / "jepa-latest.pth.tar").is_file()  # kept for inspection
    assert not torch.equal(_weights(root)["module.patch_embed.proj.weight"], before["module.patch_embed.proj.weight"])


@pytest.mark.slow
@pytest.mark.parametrize("in_memory", [True, False], ids=["in_memory", "streaming"])
def test_a_preempted_pretrain_stage_resumes_mid_epoch_to_the_uninterrupted_result(tmp_path, monkeypatch, in_memory):
    """The stage stopped by a preemption request in the middle of its second epoch (the flag USR2 sets under
    submitit), then run again, ends bit-identical to an uninterrupted run with one step row per step: for the
    decoded split and for the streaming loader. The submitit test below runs the streaming one under real requeues."""
    from pipeline import preemption

    root, params = shard_project(tmp_path / "cut", 2, in_memory)
    ref_root, ref_params = shard_project(tmp_path / "ref", 2, in_memory)
    ref = stage.run_stage("pretrain", pretrain_stage.run, pretrain_stage.SECTIONS, root=ref_root, params=ref_params)
    asked = iter(range(10**6))
    monkeypatch.setattr(preemption, "requested", lambda: next(asked) == 30)  # 22 steps per epoch
    cut = stage.run_stage("pretrain", pretrain_stage.run, pretrain_stage.SECTIONS, root=root, params=params)
    assert cut["stopped"] and 22 < cut["steps"] < 44, cut
    assert load_checkpoint_meta(root / "models/resume/pretrain/jepa-latest.pth.tar")["step"] == cut["steps"]
    assert not (root / "models/pretrain").exists()  # the DVC output holds finished runs only
    monkeypatch.setattr(preemption, "requested", lambda: False)
    done = stage.run_stage("pretrain", pretrain_stage.run, pretrain_stage.SECTIONS, root=root, params=params)
    assert done["steps"] == ref["steps"] == 44 and done["final_loss"] == ref["final_loss"]
    timing = json.loads((root / "models/pretrain" / pretrain_stage.TIMING).read_text())
    assert timing["steps"] == 44 and timing["seconds"] > 0  # the speed counts both invocations' steps and time
    assert done["images_per_second"] == round(44 * 8 / timing["seconds"], 1)
    for name, t in _weights(ref_root).items():
        assert torch.equal(_weights(root)[name], t), name
    rows = (root / "metrics/pretrain_steps.csv").read_text().splitlines()
    assert rows == (ref_root / "metrics/pretrain_steps.csv").read_text().splitlines() and len(rows) == 1 + 44


def _preempt(job, rows: Path, at_step: int, deadline: float) -> None:
    """Once the job's step log holds ``at_step`` rows, USR2 to each of its tasks (what submitit's local controller
    sends ``signal_delay_s`` before the time limit, and SLURM before a preemption); returns when the requeued
    job's tasks have replaced them."""
    while not rows.exists() or len(rows.read_text().splitlines()) - 1 < at_step:
        assert time.monotonic() < deadline and not job.done(), f"the job did not reach step {at_step}"
        time.sleep(0.02)
    tasks = psutil.Process(job._process.pid).children()
    assert len(tasks) == 2
    for task in tasks:
        task.send_signal(signal.SIGUSR2)
    while {t.pid for t in psutil.Process(job._process.pid).children()} & {t.pid for t in tasks}:
        assert time.monotonic() < deadline, "the preempted tasks did not end"
        time.sleep(0.05)


@pytest.mark.process
@pytest.mark.slow
def test_submitit_job_preempted_twice_requeues_and_resumes_exactly(tmp_path):
    """2 local tasks under submitit, the streaming loader; preempted twice mid-epoch (USR2 to every task): each
    time it stops at a step boundary, saves, requeues and resumes, and it ends bit-identical to an uninterrupted
    job, with one step row per step (the decoded split resumes exactly too: above)."""
    epochs, in_memory = 8, False  # 88 steps of 2 x 8 images
    root, params = shard_project(tmp_path / "cut", epochs, in_memory)
    ref_root, ref_params = shard_project(tmp_path / "ref", epochs, in_memory)
    lp = dataclasses.replace(section(params, "launcher"), kind="local", tasks_per_node=2, max_requeues=5, time_min=30)
    ref = launch.make_executor(lp, tmp_path / "logs-ref").submit(stage.StageJob(str(ref_root), ref_params))
    job = launch.make_executor(lp, tmp_path / "logs-cut").submit(stage.StageJob(str(root), params))
    deadline, rows = time.monotonic() + 400, root / "models/resume/pretrain/steps.csv"  # the running job's log
    _preempt(job, rows, 20, deadline)  # inside epoch 2
    _preempt(job, rows, 50, deadline)  # inside epoch 5
    results, ref = job.results(), ref.results()
    log = "".join(p.read_text() for p in (tmp_path / "logs-cut").glob("*_0_log.*"))
    assert log.count("Calling checkpoint method") == log.count("Requeued job") == 2, log[-3000:]
    assert log.count("stopping at the next step or epoch boundary") == 2
    assert results[0]["steps"] == ref[0]["steps"] == epochs * (180 // 16) and results[0]["world_size"] == 2
    a, b = _weights(root), _weights(ref_root)
    for name, t in b.items():
        assert torch.equal(a[name], t), name
    assert not rows.exists()  # the finished run moved to models/pretrain, its logs published
    lines = (root / "metrics/pretrain_steps.csv").read_text().splitlines()
    assert len(lines) == 1 + epochs * 11  # one row per step, none doubled by the requeues
    assert lines == (ref_root / "metrics/pretrain_steps.csv").read_text().splitlines()
