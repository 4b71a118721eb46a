"""One resume policy for every long stage: what a saved run must match to be continued, what happens to one
that does not, and where each stage keeps its state.

- **The key.** A run continues only under the same key: a hash of the params sections that change the weights
  (settings that change none, such as the health monitor's or the tracking's, are excluded by the stage), the
  world size (the effective batch and each rank's data) and hashes of the inputs (training shards, the
  encoder checkpoint).
- **Stale runs are set aside, never resumed and never deleted**: a saved state under another key is moved to
  ``<name>.stale-<unix time>`` beside it, with one line saying so, and training starts afresh.
- **Where.** Outside the stages' DVC outputs (DVC deletes those before it reruns a stage, and `dvc exp run`
  checks them out of its cache): pretraining in ``models/resume/pretrain/`` (checkpoint and logs), moved to its
  output ``models/pretrain`` (persistent: a finished run is re-entered from there) when it finishes; the other
  stages in ``models/resume/<stage>.pt`` after every epoch, removed once they finish; a job's id in
  ``models/resume/<stage>.job.json`` (``pipeline.launch``).
- **Stops.** SLURM's warning signal (``pipeline.preemption``) stops a run at the next step (pretraining) or epoch
  (the others) boundary after its state is saved; submitit then requeues the job, and the requeued job resumes.
  A kill -9 loses at most the current epoch (pretraining: the steps since its last checkpoint).
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterable, Mapping
from pathlib import Path

from ijepa.checkpoint import atomic_save, load_checkpoint_meta, read_checkpoint

from .context import params_hash

RESUME_DIR = Path("models/resume")


def run_key(params: Mapping, sections: Iterable[str], *, exclude: Mapping[str, Iterable[str]] = (), **inputs) -> str:
    """The key of a run: ``sections`` of ``params`` without the ``exclude``d keys of each, plus ``inputs``
    (world size, hashes of the data and checkpoints)."""
    drop = {s: set(keys) for s, keys in dict(exclude).items()}
    trained = {}
    for s in sections:
        value = params[s]
        if s in drop and isinstance(value, Mapping):
            value = {k: v for k, v in value.items() if k not in drop[s]}
        trained[s] = value
    return params_hash({**trained, **inputs})


def shards_key(split: Mapping) -> str:
    """A split of the manifest by its shards' sha256: other images start a run afresh."""
    return params_hash([s["sha256"] for s in split["shards"]])


def file_key(path: str | Path) -> str:
    """A checkpoint by its size and modification time (cheap; a new pretraining changes both)."""
    st = Path(path).stat()
    return params_hash([st.st_size, st.st_mtime_ns])


def folder_key(path: str | Path) -> str:
    """A data folder by its files' names, sizes and modification times (regenerated data changes them)."""
    root = Path(path)
    files = sorted(f for f in root.rglob("*") if f.is_file())
    return params_hash([(f.relative_to(root).as_posix(), f.stat().st_size, f.stat().st_mtime_ns) for f in files])


def set_aside(path: Path, stage: str, why: str) -> Path:
    """Move ``path`` (a file or folder) to ``<path>.stale-<time>`` beside it, and say so in one line."""
    stale = path.with_name(f"{path.name}.stale-{int(time.time())}")
    shutil.move(path, stale)
    print(f"{stage}: {path} {why}; moved to {stale}, starting fresh", flush=True)
    return stale


def checkpoint_step(out: Path, latest: str, key: str, stage: str) -> int:
    """Pretraining's policy: the step of ``out/latest`` when it was written under ``key``; a checkpoint written
    under another is set aside with its whole folder (0)."""
    path = out / latest
    if not path.exists():
        return 0
    meta = load_checkpoint_meta(path)
    if meta.get("params", {}).get("params_hash") == key:
        return int(meta["step"])
    set_aside(out, stage, f"holds {latest}, trained with other params or training data")
    return 0


def check_history(rows: list[dict], start: int, path: Path, checkpoint: Path) -> None:
    """A resumed run needs the step rows before its checkpoint (its metrics and plots use them)."""
    if [int(r["step"]) for r in rows] != list(range(start)):  # FileNotFoundError: the stage CLI prints one line
        raise FileNotFoundError(
            f"{path} holds {len(rows)} step rows but {checkpoint} resumes at step {start}: the loss history of the "
            f"run being resumed is missing or incomplete; restore {path}, or delete {checkpoint.parent} to train "
            "from scratch"
        )


class EpochState:
    """A stage's state after its last finished epoch, in ``root/models/resume/<name>.pt``, under ``key``.

    The training loops (``ijepa.finetune.train_classifier``, ``ijepa.seg.train.train_segmentation``) call
    ``load`` once, ``save`` after every epoch (rank 0 writes; every rank loads), and the stage calls ``finish``
    when its outputs are written.
    """

    def __init__(self, root: Path, name: str, key: str, *, stage: str | None = None, is_main: bool = True):
        self.path, self.key, self.stage, self.is_main = root / RESUME_DIR / f"{name}.pt", key, stage or name, is_main

    def companion(self, suffix: str) -> Path:
        """A file that lives and dies with the state (``<name>.<suffix>``), e.g. the best model so far."""
        return self.path.with_name(f"{self.path.stem}.{suffix}")

    def load(self) -> dict | None:
        """The saved state when it was written under this key (else None; another key's is set aside)."""
        if not self.path.exists():
            return None
        state = read_checkpoint(self.path, what=f"{self.stage} resume file", keys=("key", "state"))
        if state["key"] == self.key:
            done = state["state"].get("epochs_done")
            if self.is_main:
                print(f"{self.stage}: resuming from {self.path} ({done} epochs done)", flush=True)
            return state["state"]
        if self.is_main:
            set_aside(self.path, self.stage, "was saved under other params, data or checkpoint")
        return None

    def save(self, state: Mapping) -> None:
        if self.is_main:
            atomic_save({"key": self.key, "state": dict(state)}, self.path)

    def finish(self) -> None:
        """The run is done and its outputs written: the state goes (its companions are the stage's to move)."""
        if self.is_main:
            self.path.unlink(missing_ok=True)
