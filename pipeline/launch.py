"""Where a distributed stage runs when DVC runs it: ``launcher.kind``.

- ``inline``: in the stage's own process (the demo; ``torchrun`` also starts stages this way).
- ``local``: a submitit job of ``tasks_per_node`` processes on this machine.
- ``slurm``: a submitit job on SLURM.

Under ``local`` and ``slurm`` the stage's command (still ``python -m stages.<name>`` in dvc.yaml) submits the job
with the params DVC composed, keeps its id in ``models/resume/<stage>.job.json``, prints the job's state and
rank 0's progress lines while it waits, and returns the job's metrics only when the job completed, with its
outputs in the workspace; so ``dvc.lock`` records what the job trained. A waiting process that dies leaves
the job running: the next run of the stage finds the job still queued or running under the same params and
waits for it instead of submitting another; a job that ended while nobody waited is followed by a new one,
which resumes from the stage's saved state (``pipeline.resume``).

SLURM without accounting (no ``sacct``) is the common case on small clusters and on ``make slurm-up``'s, so
the state comes from ``squeue`` while the job is known to the queue, then from ``scontrol`` (for a few minutes
after it ended), and the outcome from submitit's result file of rank 0.
"""

from __future__ import annotations

import codecs
import contextlib
import io
import json
import re
import subprocess
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import psutil
import submitit
from submitit.core.utils import FailedJobError, JobPaths

from ijepa.errors import UserError

from .params import LauncherParams
from .resume import RESUME_DIR
from .schema import ParamError

STAGES = ("pretrain", "finetune", "extract", "seg_train", "attnprobe")  # the stages that run on several processes
RESUMING = ("pretrain", "attnprobe", "finetune", "seg_train")  # stop at a step or epoch boundary, save, requeue
# squeue's pending reasons that no amount of waiting clears: the job asks for more than the partition has or
# allows, or for an account, QOS or constraint that does not exist
NEVER_STARTS = frozenset(
    [
        "PartitionConfig",
        "PartitionNodeLimit",
        "PartitionTimeLimit",
        "BadConstraints",
        "InvalidAccount",
        "InvalidQOS",
        "AccountNotAllowed",
        "QOSNotAllowed",
        "QOSMaxNodePerJobLimit",
        "QOSMaxCpuPerJobLimit",
        "QOSMaxGRESPerJob",
        "QOSMaxWallDurationPerJobLimit",
    ]
)
# states of a job that is queued or running (UNANSWERED: squeue failed, as a busy controller's can: keep waiting)
ACTIVE = frozenset(
    [
        "PENDING",
        "CONFIGURING",
        "RUNNING",
        "COMPLETING",
        "REQUEUED",
        "REQUEUE_HOLD",
        "REQUEUE_FED",
        "RESIZING",
        "SUSPENDED",
        "STAGE_OUT",
        "SIGNALING",
        "RESV_DEL_HOLD",
        "STOPPED",
        "UNANSWERED",
    ]
)


class JobError(UserError):
    """A job that cannot start, failed, was cancelled or ended without a result: one line, exit code 2."""


def world_size(launcher: LauncherParams) -> int:
    return launcher.nodes * launcher.tasks_per_node


def make_executor(launcher: LauncherParams, folder: str | Path, stage: str = "pretrain") -> submitit.Executor:
    """A submitit executor for ``launcher.kind`` ("slurm", or "local" processes on this machine)."""
    common = dict(
        nodes=launcher.nodes,
        tasks_per_node=launcher.tasks_per_node,
        gpus_per_node=launcher.gpus_per_node,
        timeout_min=launcher.time_min,
    )
    if launcher.kind == "slurm":
        ex = submitit.AutoExecutor(folder, cluster="slurm", slurm_max_num_timeout=launcher.max_requeues)
        extra = {k: v for k, v in (("slurm_partition", launcher.partition), ("slurm_account", launcher.account)) if v}
        ex.update_parameters(
            name=f"ijepa-{stage}",
            cpus_per_task=launcher.cpus_per_task,
            mem_gb=launcher.mem_gb,
            slurm_signal_delay_s=launcher.signal_delay_s,
            **common,
            **extra,
        )
        return ex
    if launcher.kind != "local":
        raise ParamError(f"launcher.kind: {launcher.kind} runs in the stage's process, not as a job")
    if launcher.nodes != 1:
        raise ParamError(f"launcher.nodes: {launcher.nodes} with launcher.kind=local; local runs have one node")
    ex = submitit.LocalExecutor(folder, max_num_timeout=launcher.max_requeues)
    ex.update_parameters(signal_delay_s=launcher.signal_delay_s, **common)
    return ex


@dataclass(frozen=True)
class JobRecord:
    """What the next run of a stage needs to find its job again."""

    job_id: str
    kind: str
    key: str  # the stage's params and world size the job was submitted with
    folder: str  # submitit's folder of this job (logs, result files)
    submitted: float  # unix time

    def paths(self, task: int = 0) -> JobPaths:
        return JobPaths(self.folder, job_id=self.job_id, task_id=task)


def record_path(root: Path, stage: str) -> Path:
    return root / RESUME_DIR / f"{stage}.job.json"


def read_record(path: Path) -> JobRecord | None:
    if not path.exists():
        return None
    try:
        return JobRecord(**json.loads(path.read_text()))
    except (json.JSONDecodeError, TypeError) as e:
        raise JobError(
            f"{path}: not the job record a stage writes ({e}); delete it (after `scancel` of the job it names, if "
            "one is still running) to submit afresh"
        ) from e


@dataclass(frozen=True)
class JobState:
    name: str  # SLURM's state (PENDING, RUNNING, CANCELLED...), RUNNING or ENDED for local jobs, UNKNOWN
    reason: str = ""

    @property
    def active(self) -> bool:
        return self.name in ACTIVE

    def __str__(self) -> str:
        return f"{self.name} ({self.reason})" if self.reason and self.reason != "None" else self.name


def job_state(record: JobRecord) -> JobState:
    """The job's state now; ENDED (local) or UNKNOWN (SLURM has forgotten it) once it is over."""
    if record.kind == "local":
        try:
            proc = psutil.Process(int(record.job_id))  # the local controller; a reused pid runs something else
            alive = proc.status() != psutil.STATUS_ZOMBIE and "submitit.local._local" in " ".join(proc.cmdline())
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            alive = False
        return JobState("RUNNING" if alive else "ENDED")
    queue = _slurm(["squeue", "-h", "-j", record.job_id, "-o", "%T|%r"])
    if queue.returncode == 0 and queue.stdout.strip():
        name, _, reason = queue.stdout.strip().splitlines()[0].partition("|")
        return JobState(name.strip(), reason.strip())
    if queue.returncode != 0 and "Invalid job id" not in queue.stderr:  # the controller did not answer: wait on
        return JobState("UNANSWERED", (queue.stderr.strip().splitlines() or [f"squeue exit {queue.returncode}"])[0])
    shown = _slurm(["scontrol", "show", "job", record.job_id, "-o"])  # kept for MinJobAge after the end
    fields = dict(f.split("=", 1) for f in shown.stdout.split() if "=" in f) if shown.returncode == 0 else {}
    return JobState(fields.get("JobState", "UNKNOWN"), fields.get("Reason", ""))


def _slurm(cmd: list[str]) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    except FileNotFoundError as e:
        raise JobError(f"launcher.kind: slurm, but `{cmd[0]}` is not on PATH (not a SLURM login node?)") from e
    except subprocess.TimeoutExpired:
        return subprocess.CompletedProcess(cmd, 1, "", f"{cmd[0]} did not answer in 60 s")


def result(record: JobRecord):
    """Rank 0's ("success", metrics) or ("error", traceback) of this job, or None (none written since it was
    submitted: the job was cancelled, killed or ran out of requeues)."""
    path = record.paths(0).result_pickle
    if not path.exists() or (record.kind == "local" and path.stat().st_mtime < record.submitted - 1):
        return None  # a local job's id is its controller's pid, which an older job may have had
    return submitit.core.utils.pickle_load(path)


class LogTail:
    """Rank 0's new log lines since the last call: its stdout, and its stderr's lines and progress bars (of a bar
    redrawn several times since the last call, only its latest state)."""

    def __init__(self, record: JobRecord):
        paths = record.paths(0)
        self.files = {paths.stdout: 0, paths.stderr: 0}
        self.partial = {paths.stdout: "", paths.stderr: ""}
        # a read can end inside a character (a bar's blocks are several bytes each)
        self.decoders = {path: codecs.getincrementaldecoder("utf-8")(errors="replace") for path in self.files}

    def new_lines(self) -> list[str]:
        lines: list[str] = []
        for path, offset in self.files.items():
            if not path.exists():
                continue
            with open(path, "rb") as f:
                f.seek(offset)
                data = f.read()
            self.files[path] = offset + len(data)
            text = self.partial[path] + self.decoders[path].decode(data)
            pieces = re.split(r"(\r|\n)", text)
            self.partial[path] = pieces[-1]  # no line end yet
            pending = ""  # a bar's state, shown unless the same line is drawn again before it ends
            for piece, end in zip(pieces[0:-1:2], pieces[1::2], strict=True):
                if end == "\r":
                    pending = piece.rstrip() or pending
                    continue
                if piece.strip() or pending:
                    lines.append(piece.rstrip() if piece.strip() else pending)
                pending = ""
            if pending:
                lines.append(pending)
        return lines


def log_tail(path: Path, lines: int = 20) -> str:
    """The last ``lines`` non-empty lines of a log (progress bars' redraws count as lines)."""
    if not path.exists():
        return f"(no {path})"
    text = path.read_text(errors="replace").replace("\r", "\n")
    return "\n".join([line for line in text.splitlines() if line.strip()][-lines:])


def run_job(
    stage: str, task: Callable, launcher: LauncherParams, key: str, *, root: Path, log_root: Path, say=print
) -> dict:
    """Run ``task`` (a ``submitit.helpers.Checkpointable`` that runs the stage) as a job and return its metrics:
    re-attach to the stage's job when one submitted under ``key`` is still queued or running, else submit one.

    Args:
        stage: the stage's name; root: the run's folder (the record goes to ``root/models/resume``);
        log_root: the folder under which ``launcher.folder`` holds the jobs' logs (the user's repository, so
        that the logs of a ``dvc exp run --queue`` run outlive its temporary copy); key: the stage's params and
        world size; say: where the progress goes.
    """
    path = record_path(root, stage)
    record = read_record(path)
    if record is not None:
        state = job_state(record)
        if state.active and record.key == key:
            say(
                f"launch: {stage}: re-attaching to job {record.job_id} ({state}), submitted "
                f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(record.submitted))}"
            )
        elif state.active:
            stop = f"scancel {record.job_id}" if record.kind == "slurm" else f"kill {record.job_id}"
            raise JobError(
                f"{stage}: job {record.job_id} ({state}) was submitted with other params and writes this stage's "
                f"outputs; wait for it to end or stop it (`{stop}`), then run the stage again"
            )
        else:
            say(
                f"launch: {stage}: job {record.job_id} ended while nobody waited ({state}); a new job continues "
                "from the stage's saved state"
            )
            record = None
    if record is None:
        record = submit(stage, task, launcher, key, root=root, log_root=log_root, say=say)
    return wait(stage, record, path, poll_s=launcher.poll_s, say=say)


def submit(
    stage: str, task: Callable, launcher: LauncherParams, key: str, *, root: Path, log_root: Path, say=print
) -> JobRecord:
    """Submit ``task`` and keep its record at ``record_path(root, stage)``."""
    folder = log_root / launcher.folder / "%j"
    executor = make_executor(launcher, folder, stage)
    submitted = time.time()
    try:
        with contextlib.redirect_stderr(io.StringIO()):  # submitit prints sbatch's refusal, which we say in one line
            job = executor.submit(task)
    except FailedJobError as e:  # sbatch refused it: an unknown partition or account, impossible resources
        said = [line.split("error:", 1)[-1].strip() for line in str(e).splitlines() if "error:" in line]
        raise JobError(f"{stage}: SLURM refused the job: {'; '.join(said) or str(e).strip()}") from e
    record = JobRecord(str(job.job_id), launcher.kind, key, str(folder), submitted)
    path = record_path(root, stage)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(asdict(record), indent=1) + "\n")
    say(
        f"launch: {stage}: submitted job {record.job_id} ({launcher.kind}, {launcher.nodes} node(s) x "
        f"{launcher.tasks_per_node} task(s) = world size {world_size(launcher)}); logs in {record.paths(0).folder}"
    )
    return record


def wait(stage: str, record: JobRecord, path: Path, *, poll_s: float, say=print) -> dict:
    """Follow the job to its end, saying its state changes and rank 0's progress lines; its metrics when it
    completed.

    Raises ``JobError`` (one line) for a job that can never start (cancelled here), failed (after the tail of its
    error log), was cancelled or ended without a result; the record at ``path`` goes in each of these cases. A
    stopped wait (Ctrl-C, the login session ending) leaves job and record for the next run to re-attach."""
    tail, last = LogTail(record), None
    try:
        while True:
            state = job_state(record)
            if str(state) != last:
                say(f"launch: {stage}: job {record.job_id} {state}")
                last = str(state)
            for line in tail.new_lines():
                say(f"  [{record.job_id}] {line}")
            if state.name == "PENDING" and state.reason in NEVER_STARTS:
                subprocess.run(["scancel", record.job_id], capture_output=True)
                path.unlink(missing_ok=True)
                raise JobError(
                    f"{stage}: job {record.job_id} can never start (SLURM: {state.reason}: more nodes, tasks, CPUs, "
                    "memory or time than the partition has or allows, or an account, QOS or constraint it does not "
                    "know); cancelled it: change the launcher params"
                )
            if not state.active:
                break
            time.sleep(poll_s)
    except KeyboardInterrupt:
        time.sleep(1)  # a local job shares the terminal's Ctrl-C: see whether it stopped too
        if job_state(record).active:
            stop = f"scancel {record.job_id}" if record.kind == "slurm" else f"kill {record.job_id}"
            say(
                f"launch: {stage}: stopped waiting; job {record.job_id} goes on (`{stop}` stops it) and the next "
                "run of this stage re-attaches to it"
            )
        else:
            say(
                f"launch: {stage}: stopped; job {record.job_id} stopped too, and the next run of this stage "
                "continues from its saved state"
            )
        raise
    for line in tail.new_lines():
        say(f"  [{record.job_id}] {line}")
    outcome = _outcome(record, state)
    path.unlink(missing_ok=True)
    log = record.paths(0).stderr
    if outcome is not None and outcome[0] == "success":
        return outcome[1]
    if outcome is not None:  # the stage raised in the job: the traceback's last line is the error
        say(log_tail(log))
        error = [line for line in str(outcome[1]).splitlines() if line.strip()][-1].strip()
        raise JobError(f"{stage}: job {record.job_id} failed: {error} (log: {log})")
    if state.name == "CANCELLED" or (log.exists() and "CANCELLED" in log.read_text(errors="replace")):
        raise JobError(f"{stage}: job {record.job_id} was cancelled; run the stage again to continue it")
    say(log_tail(log))
    raise JobError(
        f"{stage}: job {record.job_id} ended without a result ({state}); run the stage again to continue from its "
        f"saved state (log: {log})"
    )


def _outcome(record: JobRecord, state: JobState, grace_s: float = 5.0):
    """The result file, which can lag the job's end by a moment on a shared file system (not for a job that
    SLURM says was cancelled, which writes none)."""
    deadline = time.monotonic() + (0 if state.name == "CANCELLED" else grace_s)
    while (found := result(record)) is None and time.monotonic() < deadline:
        time.sleep(0.25)
    return found
