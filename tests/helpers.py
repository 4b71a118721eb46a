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

import cv2
import numpy as np
import torch
import yaml
from PIL import Image

from ijepa import create_encoder, create_predictor
from ijepa.distributed import DistEnv, init_distributed
from ijepa.engine import build_optimizer
from ijepa.jepa import JEPA
from ijepa.seg.data import SegClasses
from pipeline import stage
from stages import prepare

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


# -- image folders, segmentation scenes, checkpoints and projects that several modules build ----------


FOLDER_CLASSES = ["cat", "dog", "eel"]  # make_folder's classes


def pattern(label: int, i: int, size=(24, 20)) -> np.ndarray:
    rng = np.random.default_rng(100 * label + i)
    img = rng.integers(0, 60, (*size, 3), dtype=np.uint8)
    img[..., label] += 150  # class-coloured
    return img


def write_jpeg(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path, format="JPEG", quality=90)


def make_folder(root: Path, per_class=6) -> Path:
    for c, name in enumerate(FOLDER_CLASSES):
        for i in range(per_class):
            write_jpeg(root / name / f"img_{i}.jpg", pattern(c, i, size=(20 + i, 24)))
    return root


SEG_CLASSES = SegClasses(  # seg_scenes' classes
    ("background", "cat", "dog"),
    ((0, 0, 0), (128, 0, 0), (0, 128, 0)),
    ((0, 0, 0), (255, 0, 0), (0, 255, 0)),
    ((224, 224, 192),),
)


def write_seg_pair(folder, stem, img, mask):
    (folder / "images").mkdir(parents=True, exist_ok=True)
    (folder / "masks").mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(folder / "images" / f"{stem}.png"), img)
    cv2.imwrite(str(folder / "masks" / f"{stem}.png"), mask)


def seg_scenes(folder, n, seed, size=(24, 40)):
    """Bright rectangles (cat) and dark rectangles (dog) on noise, as colour masks."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        img = rng.integers(60, 120, (*size, 3), dtype=np.uint8)
        ids = np.zeros(size, np.uint8)
        for cls, value in ((1, 250), (2, 5)):
            y, x = rng.integers(0, size[0] - 8), rng.integers(0, size[1] - 8)
            img[y : y + 8, x : x + 8] = value
            ids[y : y + 8, x : x + 8] = cls
        rgb = np.asarray(SEG_CLASSES.label_colors, np.uint8)[ids]
        write_seg_pair(folder, f"s{i:03d}", img, rgb[..., ::-1])


def official_checkpoint(path: Path) -> Path:
    """What upstream's train.py writes, for an encoder of the demo geometry (28 px, patch 4)."""
    torch.manual_seed(0)
    enc = create_encoder("vit_tiny", patch_size=4, img_size=28, depth=2)
    pred = create_predictor("vit_tiny", patch_size=4, img_size=28, depth=1, predictor_embed_dim=48)
    jepa = JEPA(enc, pred)
    state = {
        k: {f"module.{n}": t for n, t in getattr(jepa, k).state_dict().items()}
        for k in ("encoder", "predictor", "target_encoder")
    }
    state |= {
        "opt": build_optimizer(jepa).state_dict(),
        "scaler": None,
        "epoch": 1,
        "loss": 0.3,
        "batch_size": 8,
        "world_size": 1,
        "lr": 1e-3,
    }
    torch.save(state, path)
    return path


def join_gloo(rank: int, world: int, port: int) -> None:
    os.environ |= {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    os.environ |= {"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank)}
    init_distributed(DistEnv(rank, world, rank), torch.device("cpu"))


def shard_project(root: Path, epochs: int, in_memory: bool = True) -> tuple[Path, dict]:
    """A project folder with real shards of 180 training images and tiny-model params (``in_memory``: the
    demo's decoded split; False: the streaming loader with one worker)."""
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    src = root.parent / f"{root.name}-fm"
    if not src.exists():
        mini_fashion_mnist(src, 200, 20)
    # 180 training images (the step counts asserted below), whatever the demo's split
    params["prepare"] |= {
        "source": params["prepare"]["source"] | {"dir": str(src)},
        "shard_size": 32,
        "val_fraction": 0.1,
    }
    params["model"] |= {"depth": 1, "pred_depth": 1, "pred_emb_dim": 48}
    params["pretrain"] |= {"epochs": epochs, "batch_size": 8}
    params["data"] |= {"num_workers": 1, "in_memory": in_memory}
    params["tracking"]["enabled"] = False
    root.mkdir(parents=True)
    shutil.copytree(ROOT / "params", root / "params")  # the launcher groups `launcher=slurm` loads
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    stage.run_stage("prepare", prepare.run, prepare.SECTIONS, root=root, params=params)
    return root, params
