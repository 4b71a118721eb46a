"""The one entry point every stage module uses: read params, validate, track, run, report; for the distributed
stages, in this process or as a job (``launcher.kind``, ``pipeline.launch``)."""

from __future__ import annotations

import importlib
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import submitit

from ijepa.errors import USER_FACING, report

from . import launch, preemption
from .context import StageContext, params_hash, seed_everything
from .params import ParamError, load_params, section
from .tracking import make_tracker

RunFn = Callable[[dict, StageContext, object], dict]
Describe = Callable[[dict, int], "str | None"]


def run_stage(
    name: str, run: RunFn, sections: Sequence[str], *, root: str | Path | None = None, params: dict | None = None
) -> dict:
    """Validate the stage's params sections, open tracking (failing early if the store is unusable), call
    ``run(params, ctx, tracker)`` and log its metrics.

    Args:
        name: stage name (MLflow tag, output names).
        run: the stage body; receives the whole params dict (it parses the sections it needs).
        sections: params sections the stage depends on (validated before any work, logged to MLflow).
        root: working directory (default: cwd); params: use this dict instead of ``root/params.yaml``.
    Returns:
        the stage's metrics dict.
    """
    ctx = StageContext.from_env(name, root)
    params = params if params is not None else load_params(ctx.root / "params.yaml")
    for s in sections:
        section(params, s)
    tracking = section(params, "tracking")
    subset = {s: params[s] for s in sections}
    seed_everything(section(params, "seed") if "seed" in params else 0)
    t0 = time.perf_counter()
    with make_tracker(
        ctx, enabled=tracking.enabled, experiment=tracking.experiment, params=subset, all_params=params
    ) as tracker:
        tracker.log_dict(subset, "params/resolved.json")
        metrics = run(params, ctx, tracker)
        metrics = {**metrics, "stage_seconds": round(time.perf_counter() - t0, 2)}
        tracker.log_metrics({k: v for k, v in metrics.items() if isinstance(v, int | float)})
    return metrics


def stage_module(stage: str):
    """The stage module itself, not a copy of it: the same code path as an inline run."""
    if stage not in launch.STAGES:
        raise ParamError(f"{stage}: only {', '.join(launch.STAGES)} run distributed")
    return importlib.import_module(f"stages.{stage}")


class StageJob(submitit.helpers.Checkpointable):
    """One task of a stage's job (pickled by submitit; resubmitted as is on requeue)."""

    def __init__(self, root: str, params: dict, stage: str = "pretrain"):
        self.root, self.params, self.stage = str(root), params, stage

    def __call__(self) -> dict | None:
        module = stage_module(self.stage)
        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
        if self.stage in launch.RESUMING:
            preemption.install()  # stop at a step boundary and save; others keep submitit's requeue
        env = submitit.JobEnvironment()
        print(
            f"launch: {self.stage} task {env.global_rank}/{env.num_tasks} of job {env.job_id} on {env.hostname}",
            flush=True,
        )
        metrics = run_stage(self.stage, module.run, module.SECTIONS, root=self.root, params=self.params)
        if metrics.get("stopped"):
            if env.global_rank == 0:
                preemption.hand_over()  # submitit: calls checkpoint(), requeues, exits
            return None  # other ranks end here; the requeued job restarts all of them
        return metrics

    def checkpoint(self, *args, **kwargs) -> submitit.helpers.DelayedSubmission:
        # The stage's state is already on disk (saved at the step or epoch boundary): resubmit the same job.
        return submitit.helpers.DelayedSubmission(StageJob(self.root, self.params, self.stage))


def job_key(stage: str, sections: Sequence[str], params: dict, world: int) -> str:
    """What a stage's job was submitted with: its params sections (but tracking) and the world size."""
    return params_hash({"stage": stage, "world_size": world, **{s: params[s] for s in sections if s != "tracking"}})


def launched(name: str, sections: Sequence[str], root: Path, describe: Describe | None = None) -> dict | None:
    """The metrics of the stage run as a job when ``launcher.kind`` asks for one (else None: run it here).

    Under torchrun (WORLD_SIZE set) the processes are already there: the stage runs in each. Inline, the params'
    world size must be 1, so that ``dvc.lock`` never records ranks that did not train. ``describe(params, world
    size)`` gives the stage's first line about the run (or None)."""
    if name not in launch.STAGES or "WORLD_SIZE" in os.environ:
        return None
    params = load_params(root / "params.yaml")
    launcher = section(params, "launcher")
    world = launch.world_size(launcher)
    if launcher.kind == "inline":
        if world != 1:
            raise ParamError(
                f"launcher.tasks_per_node: launcher.kind=inline runs one process, but launcher.nodes x "
                f"launcher.tasks_per_node = {world}; set launcher.kind=local (ranks on this machine) or slurm, or "
                "both to 1"
            )
        return None
    for s in sections:  # fail here, not in the queue hours later
        section(params, s)
    if describe is not None and (line := describe(params, world)):
        _say(line)
    ctx = StageContext.from_env(name, root)
    key = job_key(name, sections, params, world)
    task = StageJob(str(ctx.root), params, name)
    return launch.run_job(name, task, launcher, key, root=ctx.root, log_root=ctx.dvc_root, say=_say)


def _say(line: str) -> None:
    print(line, flush=True)


def main(name: str, run: RunFn, sections: Sequence[str], describe: Describe | None = None) -> None:
    """CLI wrapper of a stage, run here or as a job (``launched``): user errors (``ijepa.errors.USER_FACING``) become
    one line on stderr and exit code 2; anything else keeps its traceback, since it is a bug."""
    try:
        metrics = launched(name, sections, Path.cwd(), describe)
        if metrics is None:
            metrics = run_stage(name, run, sections)
    except USER_FACING as e:
        report(name, e)
        sys.exit(2)
    print(f"{name}: done: {metrics}")
