"""`dvc repro` reaching the cluster: the distributed stages run as submitit jobs from inside the DVC chain
(``launcher.kind`` local or slurm), wait, re-attach after the waiting process died, and end in one line when a
job cannot start, fails or is cancelled. The SLURM tests start the one-node SLURM of `make slurm-up` (root)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from pipeline import launch
from pipeline.launch import JobError, JobRecord, LogTail

from .helpers import BIN, ROOT, debug_project, git_init, run_queue, sh

LOCAL = ("launcher.kind=local", "launcher.tasks_per_node=2")  # two ranks on this machine
# the tiny node of `make slurm-up`: 2 tasks of 1 CPU, polled every second
SLURM = [
    "launcher=slurm",
    *("launcher.tasks_per_node=2", "launcher.gpus_per_node=0", "launcher.cpus_per_task=1", "launcher.mem_gb=2"),
    *("launcher.time_min=10", "launcher.poll_s=1"),
]


@pytest.fixture(scope="module")
def chain(tmp_path_factory) -> Path:
    """A git + DVC copy of the project on the debug overlay, its shards prepared (inline)."""
    repo = debug_project(tmp_path_factory.mktemp("launch"))
    git_init(repo)
    sh(repo, "dvc", "repro", "prepare")
    return repo


def compose(repo: Path, *overrides: str) -> dict:
    """params.yaml composed with ``overrides`` (what `dvc exp run -S` does before it runs)."""
    sh(repo, sys.executable, "scripts/compose_params.py", "params.yaml", *overrides)
    return yaml.safe_load((repo / "params.yaml").read_text())


def exp_run(repo: Path, *overrides: str, target: str):
    """`dvc exp run -S override ... target` in the workspace."""
    return sh(repo, "dvc", "exp", "run", *(f"-S{o}" for o in overrides), target)


def locked_params(repo: Path, stage: str) -> dict:
    return yaml.safe_load((repo / "dvc.lock").read_text())["stages"][stage]["params"]["params.yaml"]


# -- without SLURM -------------------------------------------------------------------------------------------


def test_log_tail_gives_new_lines_and_only_the_latest_state_of_a_redrawn_bar(tmp_path):
    record = JobRecord("7", "local", "k", str(tmp_path / "%j"), time.time())
    (tmp_path / "7").mkdir()
    out, err = record.paths(0).stdout, record.paths(0).stderr
    tail = LogTail(record)
    assert tail.new_lines() == []  # no log yet
    out.write_text("launch: pretrain task 0/2\n")
    err.write_text("pretrain:  10%|#  | 1/10\rpretrain:  20%|## | 2/10\rpretrain:  30%|")
    assert tail.new_lines() == ["launch: pretrain task 0/2", "pretrain:  20%|## | 2/10"]
    with open(err, "a") as f:
        f.write("### | 3/10\rpretrain: 100%|##########| 10/10\nsaved\n")
    assert tail.new_lines() == ["pretrain: 100%|##########| 10/10", "saved"]
    assert tail.new_lines() == []


def test_a_corrupt_job_record_is_one_error_naming_it(tmp_path):
    path = launch.record_path(tmp_path, "pretrain")
    path.parent.mkdir(parents=True)
    path.write_text("{not json")
    with pytest.raises(JobError, match=r"pretrain\.job\.json: not the job record a stage writes"):
        launch.read_record(path)
    path.write_text('{"job_id": "1"}')
    with pytest.raises(JobError, match=r"pretrain\.job\.json: not the job record"):
        launch.read_record(path)


def test_a_local_job_whose_controller_is_gone_has_ended(tmp_path):
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    assert launch.job_state(JobRecord(str(gone.pid), "local", "k", str(tmp_path), 0.0)).name == "ENDED"
    # a live process that is not submitit's controller (a reused pid) is not the job either
    assert not launch.job_state(JobRecord(str(os.getpid()), "local", "k", str(tmp_path), 0.0)).active


@pytest.mark.slow
@pytest.mark.process
def test_dvc_local_pretrain_trains_with_world_size_two_and_dvc_lock_records_it(chain):
    """`dvc exp run -S launcher.kind=local -S launcher.tasks_per_node=2 pretrain`: the stage's command submits a
    2-task local job, shows it, returns when it completed; dvc.lock records the world size, not where it ran."""
    r = exp_run(chain, *LOCAL, "launcher.poll_s=1", target="pretrain")
    out = r.stdout + r.stderr
    # its first line: the effective batch is not the one the lrs were written for, and the lr rule that applies
    assert "pretrain: effective batch 32 (16 x 2 rank(s)) is not optim.ref_batch_size 64: lr 0.00015 x 0.7071" in out
    job = re.search(r"launch: pretrain: submitted job (\d+) \(local, 1 node\(s\) x 2 task\(s\) = world size 2\)", out)
    assert job, out[-3000:]
    assert f"launch: pretrain: job {job[1]} RUNNING" in out and f"[{job[1]}] launch: pretrain task 0/2" in out
    metrics = json.loads((chain / "metrics/pretrain.json").read_text())
    assert metrics["world_size"] == 2 and metrics["effective_batch_size"] == 32 and metrics["steps"] == 110 // 32
    assert metrics["lr_scale"] == 0.707107 and metrics["ref_batch_size"] == 64
    assert not launch.record_path(chain, "pretrain").exists()  # the job is over: no record to re-attach to
    assert (chain / "outputs/submitit" / job[1] / f"{job[1]}_1_log.out").is_file()
    locked = locked_params(chain, "pretrain")
    assert locked["launcher.tasks_per_node"] == 2 and locked["launcher.nodes"] == 1 and "launcher.kind" not in locked
    assert "pretrain" not in sh(chain, "dvc", "status", "pretrain").stdout
    # where and how long it runs are not params: another time limit reruns nothing
    again = exp_run(chain, *LOCAL, "launcher.time_min=30", target="pretrain")
    assert "submitted job" not in again.stdout and "'pretrain' didn't change" in again.stdout


@pytest.mark.slow
@pytest.mark.process
def test_dvc_local_failed_job_prints_its_log_tail_and_one_line(chain):
    """A job whose stage raises (here: a CUDA device on a CPU machine) fails: the tail of its error log, its path,
    and one line naming the error; exit code 2 and nothing recorded by DVC."""
    compose(chain, "launcher.kind=local", "launcher.tasks_per_node=1", "launcher.poll_s=1", "pretrain.device=cuda")
    r = sh(chain, sys.executable, "-m", "stages.pretrain", check=False)
    err = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(err) == 1, r.stdout[-2000:] + r.stderr
    assert re.fullmatch(r"pretrain: error: pretrain: job \d+ failed: .*cuda.* \(log: .*_0_log\.err\)", err[0]), err
    log = Path(err[0].rsplit("(log: ", 1)[1].rstrip(")"))
    assert log.is_file() and "Traceback" in log.read_text(), log
    assert "Traceback" in r.stdout, r.stdout[-3000:]  # the tail, shown (its log streamed, then its last lines)
    assert not launch.record_path(chain, "pretrain").exists()


# -- a real one-node SLURM -----------------------------------------------------------------------------------


def _slurm_running() -> bool:
    return shutil.which("sinfo") is not None and subprocess.run(["sinfo"], capture_output=True).returncode == 0


@pytest.fixture(scope="module")
def slurm():
    """The local SLURM of `make slurm-up`, started (and stopped) here when it is not running."""
    if os.geteuid() != 0 and not _slurm_running():
        pytest.skip("starting a local SLURM needs root")
    started = not _slurm_running()
    if started:
        subprocess.run(["bash", str(ROOT / "scripts/local_slurm.sh"), "start"], check=True, capture_output=True)
    yield
    if started:
        subprocess.run(["bash", str(ROOT / "scripts/local_slurm.sh"), "stop"], check=False, capture_output=True)


def _mtime(path: Path) -> int | None:
    return path.stat().st_mtime_ns if path.exists() else None


def refused_within_a_minute(chain: Path, *overrides: str) -> str:
    """Pretraining's command on SLURM with ``overrides``: it ends within a minute with exit code 2; its stderr."""
    compose(chain, *SLURM, *overrides)
    t0 = time.monotonic()
    r = sh(chain, sys.executable, "-m", "stages.pretrain", check=False)
    assert time.monotonic() - t0 < 60 and r.returncode == 2, r.stdout[-2000:] + r.stderr
    return r.stderr.strip()


def _jobs_submitted(out: str) -> list[str]:
    return re.findall(r"launch: \w+: submitted job (\d+) \(slurm", out)


@pytest.mark.slow
@pytest.mark.process
@pytest.mark.slurm
def test_dvc_slurm_repro_runs_pretrain_then_extract_as_jobs(chain, slurm):
    """`dvc repro extract` with launcher=slurm and 2 tasks: pretrain, then extract, each a SLURM job of 2 tasks that
    the stage's command waits for; dvc.lock records their outputs and `dvc status` is clean afterwards."""
    compose(chain, *SLURM, "pretrain.epochs=2")  # a pretraining no other test here runs
    r = sh(chain, "dvc", "repro", "extract")
    jobs = _jobs_submitted(r.stdout)
    assert len(jobs) == 2 and r.stdout.index("Running stage 'pretrain'") < r.stdout.index("Running stage 'extract'")
    assert (
        f"launch: pretrain: job {jobs[0]} RUNNING" in r.stdout and f"[{jobs[1]}] launch: extract task 0/2" in r.stdout
    )
    metrics = json.loads((chain / "metrics/pretrain.json").read_text())
    assert metrics["world_size"] == 2 and metrics["steps"] == 2 * (110 // 32)
    assert json.loads((chain / "metrics/extract.json").read_text())["train_samples"] == 110
    assert "task 1/2" in (chain / f"outputs/submitit/{jobs[1]}/{jobs[1]}_1_log.out").read_text()
    assert locked_params(chain, "extract")["launcher.tasks_per_node"] == 2
    assert "Data and pipelines are up to date" in sh(chain, "dvc", "status", "pretrain", "extract").stdout


@pytest.mark.slow
@pytest.mark.process
@pytest.mark.slurm
def test_dvc_slurm_killed_while_waiting_then_exp_run_reattaches_to_the_same_job(chain, slurm):
    """The waiting `dvc repro` is killed (-9, with the stage's waiting process) while its job runs; the next `dvc exp
    run` of the same params finds the job by its record and waits for it instead of submitting a second one, and
    the job's step log comes out whole (`dvc exp run` stashes and restores the workspace's git-tracked files, the
    published metrics among them, while the job writes)."""
    overrides = (*SLURM, "pretrain.epochs=20")  # steps still to train while `dvc exp run` stashes
    compose(chain, *overrides)
    record = launch.record_path(chain, "pretrain")
    checkpoint = chain / "models/resume/pretrain/jepa-latest.pth.tar"  # the run in progress
    before = _mtime(checkpoint)
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "PYTHONPATH")}
    env["PATH"] = f"{BIN}:{env['PATH']}"
    with open(chain / "killed.log", "w") as log:
        dvc = subprocess.Popen(
            ["dvc", "repro", "pretrain"], cwd=chain, env=env, stdout=log, stderr=log, start_new_session=True
        )
    deadline = time.monotonic() + 120
    while not (record.exists() and launch.job_state(launch.read_record(record)).name == "RUNNING"):
        assert time.monotonic() < deadline and dvc.poll() is None, (chain / "killed.log").read_text()[-3000:]
        time.sleep(0.2)
    job = launch.read_record(record).job_id
    os.killpg(dvc.pid, signal.SIGKILL)  # dvc and the stage's waiting process; the job lives in SLURM
    dvc.wait()
    assert launch.job_state(launch.read_record(record)).active
    while _mtime(checkpoint) == before:  # the job's first epoch is saved: it trains on
        assert time.monotonic() < deadline, "the job saved no epoch"
        time.sleep(0.1)
    # what `dvc exp run` does to git-tracked files before it runs a stage: back to HEAD, then the workspace's
    # state again; here with a second between, while the job trains (so its logs must not be such files)
    tracked = ("metrics/pretrain_steps.csv", "metrics/pretrain_monitor.csv")
    state = {f: (chain / f).read_bytes() if (chain / f).exists() else None for f in tracked}
    sh(chain, "git", "checkout", "--", *tracked)
    time.sleep(1)
    for f, data in state.items():
        (chain / f).unlink() if data is None else (chain / f).write_bytes(data)
    r = exp_run(chain, *overrides, target="pretrain")
    assert f"launch: pretrain: re-attaching to job {job} (RUNNING)" in r.stdout, r.stdout[-3000:]
    assert _jobs_submitted(r.stdout) == [] and not record.exists()
    metrics = json.loads((chain / "metrics/pretrain.json").read_text())
    assert metrics["world_size"] == 2 and metrics["epochs"] == 20 and metrics["first_epoch_loss"] > 0
    steps = (chain / "metrics/pretrain_steps.csv").read_text().splitlines()
    assert [int(line.split(",")[0]) for line in steps[1:]] == list(range(metrics["steps"]))
    assert "Data and pipelines are up to date" in sh(chain, "dvc", "status", "pretrain").stdout


@pytest.mark.slow
@pytest.mark.process
@pytest.mark.slurm
def test_dvc_slurm_unknown_partition_ends_in_one_line_within_a_minute(chain, slurm):
    assert refused_within_a_minute(chain, "launcher.partition=nope") == (
        "pretrain: error: pretrain: SLURM refused the job: invalid partition specified: nope; Batch job submission "
        "failed: Invalid partition name specified"
    )


@pytest.mark.slow
@pytest.mark.process
@pytest.mark.slurm
def test_dvc_slurm_job_that_can_never_start_is_cancelled_in_one_line(chain, slurm):
    """More tasks than the node has CPUs: SLURM queues the job forever (Reason=PartitionConfig); the wait ends."""
    line = refused_within_a_minute(chain, "launcher.tasks_per_node=64")
    assert re.fullmatch(r"pretrain: error: pretrain: job (\d+) can never start \(SLURM: PartitionConfig: .*", line)
    job = re.search(r"job (\d+)", line)[1]
    assert subprocess.run(["squeue", "-h", "-j", job], capture_output=True, text=True).stdout.strip() == ""
    assert not launch.record_path(chain, "pretrain").exists()


@pytest.mark.slow
@pytest.mark.process
@pytest.mark.slurm
def test_dvc_slurm_job_cancelled_by_the_user_ends_in_one_line(chain, slurm):
    compose(chain, *SLURM, "pretrain.epochs=4")
    record = launch.record_path(chain, "pretrain")
    stage = subprocess.Popen(
        [sys.executable, "-m", "stages.pretrain"], cwd=chain, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + 120
    while not record.exists():
        assert time.monotonic() < deadline and stage.poll() is None, stage.communicate()
        time.sleep(0.2)
    job = launch.read_record(record).job_id
    subprocess.run(["scancel", job], check=True)
    out, err = stage.communicate(timeout=60)
    assert stage.returncode == 2 and err.strip() == (
        f"pretrain: error: pretrain: job {job} was cancelled; run the stage again to continue it"
    ), out[-2000:] + err


@pytest.mark.slow
@pytest.mark.process
@pytest.mark.slurm
def test_dvc_slurm_queue_runs_two_experiments_as_jobs_at_once(chain, slurm):
    """`dvc exp run --queue -S launcher=slurm ...` twice, then `dvc queue start -j 2`: two SLURM jobs side by side
    (one task each, so that both fit the 2-CPU node at once), each experiment with its own results in `dvc exp
    show`."""
    compose(chain)  # the workspace's own params: the queue composes each experiment's
    sh(chain, "git", "commit", "-qam", "params")
    names = {"lr1": "0.001", "lr2": "0.002"}
    for name, lr in names.items():
        sh(
            chain,
            "dvc",
            "exp",
            "run",
            "--queue",
            "-n",
            name,
            *(f"-S{o}" for o in SLURM),
            "-Slauncher.tasks_per_node=1",
            f"-Soptim.lr={lr}",
            "pretrain",
        )
    status = run_queue(chain, workers=2, timeout_s=300)
    assert status.count("Success") >= 2, status
    jobs = {name: _jobs_submitted(sh(chain, "dvc", "queue", "logs", name).stdout) for name in names}
    assert all(len(j) == 1 for j in jobs.values()) and jobs["lr1"] != jobs["lr2"], jobs
    shown = json.loads(sh(chain, "dvc", "exp", "show", "--json").stdout)
    found = {}
    for baseline in shown:
        for exp in baseline.get("experiments") or []:
            for rev in exp.get("revs") or []:
                if rev.get("name") in names:
                    data = rev["data"]
                    found[rev["name"]] = (
                        data["params"]["params.yaml"]["data"]["optim"]["lr"],
                        data["metrics"]["metrics/pretrain.json"]["data"]["world_size"],
                        data["metrics"]["metrics/pretrain.json"]["data"]["final_loss"],
                    )
    assert {n: v[:2] for n, v in found.items()} == {"lr1": (0.001, 1), "lr2": (0.002, 1)}, found
    assert found["lr1"][2] != found["lr2"][2]  # each its own training
