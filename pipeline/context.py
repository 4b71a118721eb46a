"""Where a stage runs: repository root, DVC experiment name, git commit, rank; seeding."""

from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch


def _git(root: Path, *args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


@dataclass(frozen=True)
class StageContext:
    """Facts about one stage run, read once at the entry point."""

    stage: str
    root: Path  # where outputs go: the working directory DVC runs the stage in
    dvc_root: Path  # the user's repository (DVC_ROOT; stays the same in --temp/--queue runs)
    exp_name: str | None
    commit: str | None
    rank: int
    world_size: int

    @classmethod
    def from_env(cls, stage: str, root: str | Path | None = None) -> StageContext:
        """Read DVC_ROOT, DVC_EXP_NAME, DVC_EXP_BASELINE_REV, RANK and WORLD_SIZE."""
        work = Path(root) if root is not None else Path.cwd()
        dvc_root = Path(os.environ.get("DVC_ROOT") or work).resolve()
        commit = os.environ.get("DVC_EXP_BASELINE_REV") or _git(work, "rev-parse", "HEAD")
        return cls(
            stage,
            work.resolve(),
            dvc_root,
            os.environ.get("DVC_EXP_NAME") or None,
            commit,
            int(os.environ.get("RANK", "0")),
            int(os.environ.get("WORLD_SIZE", "1")),
        )

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def params_hash(obj) -> str:
    """Short stable hash of a params subtree."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (called at the stage entry point, never at import)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
