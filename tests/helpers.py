"""What several test modules share: the project copied into a temporary git + DVC repository, commands run in it,
a miniature Fashion-MNIST, a free port. Test modules import from here, never from each other."""

from __future__ import annotations

import gzip
import os
import shutil
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent

TEST_OVERLAY = """# @package _global_
# The debug overlay on a miniature Fashion-MNIST made by the test.
defaults:
  - debug
prepare:
  val_fraction: 0.1 # the counts asserted below, whatever the demo's split
  source:
    dir: fixtures/fm
seg_prepare:
  fashion_mnist_dir: fixtures/fm
"""


def sh(
    repo: Path, *cmd: str, check: bool = True, env: dict | None = None, log: Path | None = None
) -> subprocess.CompletedProcess:
    """Run ``cmd`` in ``repo`` with the project's .venv first on PATH; its output captured, or written to ``log``
    (for commands that leave daemons behind, which would hold a pipe open)."""
    base = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "PYTHONPATH")}
    full_env = {
        **base,
        "PATH": f"{BIN}:{os.environ['PATH']}",
        "DVC_NO_ANALYTICS": "1",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@t",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@t",
        **(env or {}),
    }
    if log is not None:
        with open(log, "w") as f:
            r = subprocess.run(cmd, cwd=repo, env=full_env, stdout=f, stderr=subprocess.STDOUT, text=True, timeout=600)
        r.stdout, r.stderr = log.read_text(), ""
    else:
        r = subprocess.run(cmd, cwd=repo, env=full_env, capture_output=True, text=True, timeout=600)
    if check and r.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    return r


def copy_project(repo: Path) -> Path:
    """The project's tracked (and untracked, not ignored) files copied into ``repo``."""
    files = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    for f in files:
        if (ROOT / f).is_file():
            (repo / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / f, repo / f)
    return repo


def debug_project(repo: Path) -> Path:
    """The project copied into ``repo`` with the debug overlay on a miniature Fashion-MNIST as its default params
    (params.yaml composed; not yet a git repository: ``git_init`` after any edit)."""
    copy_project(repo)
    mini_fashion_mnist(repo / "fixtures" / "fm", n_train=120, n_test=40)
    (repo / "params/experiment/test.yaml").write_text(TEST_OVERLAY)
    cfg = repo / "params/config.yaml"
    cfg.write_text(cfg.read_text().replace("  - experiment: null", "  - experiment: test"))
    sh(repo, sys.executable, "scripts/compose_params.py")
    return repo


def git_init(repo: Path) -> None:
    sh(repo, "git", "init", "-q")
    sh(repo, "git", "add", "-A")
    sh(repo, "git", "commit", "-qm", "test project")


def write_idx(path: Path, arr: np.ndarray, magic: int) -> None:
    header = struct.pack(">II", magic, len(arr)) + (struct.pack(">II", *arr.shape[1:]) if arr.ndim == 3 else b"")
    with gzip.open(path, "wb") as f:
        f.write(header + arr.astype(np.uint8).tobytes())


def mini_fashion_mnist(folder: Path, n_train=40, n_test=20) -> Path:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("t10k", n_test)):
        write_idx(folder / f"{split}-images-idx3-ubyte.gz", rng.integers(0, 255, (n, 28, 28)), 2051)
        write_idx(folder / f"{split}-labels-idx1-ubyte.gz", np.arange(n) % 10, 2049)
    return folder


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_queue(repo: Path, workers: int, timeout_s: float) -> str:
    """`dvc queue start -j workers`, then wait until nothing is queued or running; `dvc queue status` at the end.

    The workers are daemons that inherit `dvc queue start`'s output: a file, not a pipe, so that a worker which
    outlives its tasks cannot hang the test. Workers share kombu's filesystem broker, whose messages a worker can
    read half-written (JSONDecodeError; DVC issues #10398, #10428): its idle monitor then dies and the worker stays
    up after its task, so the workers are stopped once the queue is done."""
    sh(repo, "dvc", "queue", "start", "-j", str(workers), log=repo / "queue_start.log")
    deadline = time.time() + timeout_s
    try:
        while time.time() < deadline:
            status = sh(repo, "dvc", "queue", "status").stdout
            if "Queued" not in status and "Running" not in status:
                break
            time.sleep(2)
    finally:
        sh(repo, "dvc", "queue", "stop", check=False)
    return status
