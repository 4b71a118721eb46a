"""The paper's path: the README's ImageNet command (docs/pipeline.md's CPU block, as written) on a small JPEG folder,
in a DVC repository of its own (its own file, so `make test` runs it beside the chain of test_pipeline.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from .helpers import ROOT, copy_project, git_init, sh

pytestmark = pytest.mark.slow


def jpeg_folder(root: Path, per_class: int, seed: int) -> Path:
    """ImageFolder of class-coloured JPEGs, each side drawn in 224-400 px."""
    rng = np.random.default_rng(seed)
    for c, name in enumerate(("amber", "blue", "green", "red")):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            h, w = rng.integers(224, 401, 2)
            img = rng.integers(0, 80, (h, w, 3), dtype=np.uint8)
            img[h // 4 : 3 * h // 4, w // 4 : 3 * w // 4, c % 3] += 150
            Image.fromarray(img).save(root / name / f"{name}_{i}.JPEG", quality=85)
    return root


def docs_command(heading: str) -> str:
    """The first bash block under ``heading`` in docs/pipeline.md, continuation lines joined."""
    text = (ROOT / "docs/pipeline.md").read_text().split(heading, 1)[1]
    return text.split("```bash\n", 1)[1].split("```", 1)[0].replace("\\\n", " ")


def test_the_papers_path_on_a_small_jpeg_folder(tmp_path):
    """The README's in1k command (docs/pipeline.md's CPU block, as written) on a small JPEG folder: streaming
    loaders with more workers than shards, the monitor on (its OpenCV use once hung the forked workers)."""
    repo = copy_project(tmp_path / "project")
    git_init(repo)
    data = tmp_path / "small"
    jpeg_folder(data / "train", 24, seed=0), jpeg_folder(data / "val", 8, seed=1)
    cmd = docs_command("## The paper's path on a CPU").replace("/data/small", str(data)).split()
    assert cmd[:3] == ["dvc", "exp", "run"] and "experiment=in1k_vith14_ep300" in cmd
    run = sh(repo, *cmd)
    assert "found in sys.modules" not in run.stdout + run.stderr  # runpy's warning from each loader worker
    prep = json.loads((repo / "metrics/prepare.json").read_text())
    assert (prep["train_images"], prep["val_images"], prep["test_images"]) == (84, 12, 32)
    manifest = json.loads((repo / "data/shards/manifest.json").read_text())
    assert len(manifest["splits"]["train"]["shards"]) == 9 and len(manifest["splits"]["val"]["shards"]) == 2
    params = yaml.safe_load((repo / "params.yaml").read_text())
    assert params["data"]["num_workers"] == params["finetune"]["num_workers"] == 10  # more workers than shards
    assert params["model"]["name"] == "vit_tiny" and params["data"]["patch_size"] == 14
    pre = json.loads((repo / "metrics/pretrain.json").read_text())
    assert pre["steps"] == 84 // 8 and "final_rankme" in pre  # the monitor ran
    feats = torch.load(repo / "data/features/pretrained.pt", weights_only=False)
    assert {s: len(feats[s]["labels"]) for s in ("train", "val", "test")} == {"train": 84, "val": 12, "test": 32}
    for stage in ("extract", "linprobe", "lowshot", "knn", "search", "finetune", "seg_prepare", "seg_train"):
        assert (repo / f"metrics/{stage}.json").is_file(), stage
    lin = json.loads((repo / "metrics/linprobe.json").read_text())
    assert 0 <= lin["top1"] <= 1 and "pixels_top1" in lin
    assert "miou" in json.loads((repo / "metrics/seg_eval.json").read_text())
    ft = json.loads((repo / "metrics/finetune.json").read_text())
    assert "top1" in ft and "lp_val_top1" not in ft  # MAE's recipe: a random head, no LP-FT
    attn = json.loads((repo / "metrics/attnprobe.json").read_text())  # no token cache: tokens computed on the fly
    assert attn["tokens"] == "streamed" and 0 <= attn["top1"] <= 1 and "pixels_top1" in attn
    assert not list((repo / "data/features").glob("tokens_*.pt")) and not (repo / "models/resume/attnprobe.pt").exists()
