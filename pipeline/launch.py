"""Submit a stage to SLURM (or to local processes) through submitit: ``make stage-slurm STAGE=...``.

    python -m pipeline.launch [--stage pretrain|finetune|extract|seg_train] [launcher=slurm]
                              [launcher.KEY=VALUE ...] [--wait]

Stage params come from params.yaml, exactly as ``dvc repro`` would use them, so that ``dvc commit <stage>``
can record the outputs afterwards; only the ``launcher`` section may be changed here (a group choice like
``launcher=slurm`` loads ``params/launcher/slurm.yaml``; ``launcher.nodes=2`` sets one key).

Every task runs ``StageJob``: it exports the torch.distributed variables from the SLURM environment and runs
the stage (DDP, rank 0 writes). The training stages also handle SLURM's warning signal (USR2, ``signal_delay_s``
before the time limit, or on preemption; ``pipeline.resume``): pretraining stops at the next step boundary,
finetune, seg_train and the streaming attnprobe at the next epoch end; each saves and requeues itself, and the
requeued job resumes from there exactly as if it had not stopped. extract keeps no mid-run state: on the signal
submitit requeues it and it starts again.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

import submitit
import yaml

from . import preemption
from .params import LauncherParams, load_params, section
from .schema import ParamError
from .stage import run_stage

STAGES = ("pretrain", "finetune", "extract", "seg_train", "attnprobe")  # the stages that run on several processes
RESUMING = ("pretrain", "attnprobe", "finetune", "seg_train")  # stop at a step or epoch boundary, save, requeue


def stage_module(stage: str):
    """The stage module itself, not a copy of it: the same code path as `dvc repro`."""
    if stage not in STAGES:
        raise ParamError(f"--stage {stage}: only {', '.join(STAGES)} run distributed")
    return importlib.import_module(f"stages.{stage}")


class StageJob(submitit.helpers.Checkpointable):
    """One task of a stage's job (pickled by submitit; resubmitted as is on requeue)."""

    def __init__(self, root: str, params: dict, stage: str = "pretrain"):
        self.root, self.params, self.stage = str(root), params, stage

    def __call__(self) -> dict | None:
        module = stage_module(self.stage)
        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
        if self.stage in RESUMING:
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
        # Pretraining's state is already on disk (saved at the step boundary): resubmit the same job.
        return submitit.helpers.DelayedSubmission(StageJob(self.root, self.params, self.stage))


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
    if launcher.nodes != 1:
        raise ParamError(f"launcher.nodes: {launcher.nodes} with launcher.kind=local; local runs have one node")
    ex = submitit.LocalExecutor(folder, max_num_timeout=launcher.max_requeues)
    ex.update_parameters(signal_delay_s=launcher.signal_delay_s, **common)
    return ex


def submit_stage(executor: submitit.Executor, root: str | Path, params: dict, stage: str = "pretrain") -> submitit.Job:
    """Submit a stage of the project at ``root`` with these (validated) params."""
    return executor.submit(StageJob(str(Path(root).resolve()), params, stage))


def apply_overrides(params: dict, overrides: list[str], groups_dir: Path) -> dict:
    """``launcher=NAME`` (a group file) and ``launcher.KEY=VALUE`` (YAML value); anything else is refused."""
    params = {**params, "launcher": dict(params.get("launcher") or {})}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep:
            raise ParamError(f"{item!r}: expected KEY=VALUE")
        if key == "launcher":
            path = groups_dir / "launcher" / f"{raw}.yaml"
            if not path.is_file():
                options = sorted(p.stem for p in (groups_dir / "launcher").glob("*.yaml"))
                raise ParamError(f"launcher={raw}: no {path}; options: {', '.join(options)}")
            params["launcher"] = yaml.safe_load(path.read_text())
        elif key.startswith("launcher.") and key.count(".") == 1:
            params["launcher"][key.split(".", 1)[1]] = yaml.safe_load(raw)
        else:
            raise ParamError(
                f"{key}: only launcher settings can be overridden here; training params come from params.yaml "
                "(edit params/ and `make params`, or use `dvc exp run -S`) so that `dvc commit pretrain` records "
                "what was trained"
            )
    return params


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pipeline.launch", description=__doc__.split("\n\n")[0])
    ap.add_argument("overrides", nargs="*", help="launcher=slurm, launcher.nodes=2, ...")
    ap.add_argument("--stage", default="pretrain", help=f"the stage to run: {', '.join(STAGES)}")
    ap.add_argument("--root", default=".", help="project root (params.yaml, data/shards, outputs)")
    ap.add_argument("--wait", action="store_true", help="block until the job ends and print its metrics")
    args = ap.parse_args(argv)
    root = Path(args.root).resolve()
    try:
        params = apply_overrides(load_params(root / "params.yaml"), args.overrides, root / "params")
        launcher = section(params, "launcher")
        module = stage_module(args.stage)
        for s in module.SECTIONS:  # fail here, not in the queue hours later
            section(params, s)
        folder = root / launcher.folder / "%j"
        executor = make_executor(launcher, folder, args.stage)
    except ParamError as e:
        print(f"launch: error: {e}", file=sys.stderr)
        return 2
    job = submit_stage(executor, root, params, args.stage)
    world = launcher.nodes * launcher.tasks_per_node
    batch = params.get(args.stage, {}).get("batch_size")
    print(
        f"launch: submitted {args.stage} job {job.job_id} ({launcher.kind}, {launcher.nodes} node(s) x "
        f"{launcher.tasks_per_node} task(s) = world size {world}"
        + (f"; effective batch {batch} x {world}" if batch else "")
        + f"); logs in {str(folder).replace('%j', str(job.job_id))}"
    )
    if not args.wait:
        print(f"launch: when it has finished, record its outputs with `dvc commit {args.stage}`")
        return 0
    results = job.results()
    print(f"launch: job {job.job_id} finished: {results[0]}")
    print(f"launch: record its outputs with `dvc commit {args.stage}`")
    return 0


if __name__ == "__main__":
    sys.exit(main())
