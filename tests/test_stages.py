"""Every downstream stage on an official-layout checkpoint (no metadata, ``module.`` keys), on real shards."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
import yaml

from pipeline.schema import ParamError
from pipeline.stage import run_stage
from stages import (
    attnprobe,
    extract,
    finetune,
    knn,
    linprobe,
    lowshot,
    prepare,
    search,
    seg_eval,
    seg_prepare,
    seg_train,
)

from .helpers import mini_fashion_mnist, official_checkpoint

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    root = tmp_path_factory.mktemp("stages")
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["prepare"] |= {
        "source": params["prepare"]["source"] | {"dir": str(mini_fashion_mnist(root / "fm", 200, 60))},
        "shard_size": 64,
        "val_fraction": 0.1,  # the counts asserted below, whatever the demo's split
    }
    ckpt = str(official_checkpoint(root / "IN1K-vit.t.4-official.pth.tar"))
    params["extract"] |= {"checkpoint": ckpt, "batch_size": 64, "num_workers": 0}
    params["linprobe"] |= {"epochs": 5, "lrs": [0.01, 0.1]}
    params["attnprobe"] |= {"epochs": 2, "lrs": [0.001, 0.01]}
    params["lowshot"] |= {"shots": [1, 3], "fractions": [0.1], "subsets": 2, "epochs": 10}
    params["search"] |= {"grid_queries": 3, "k": 3}
    params["finetune"] |= {"checkpoint": ckpt, "epochs": 2, "batch_size": 32, "num_workers": 0, "warmup_epochs": 0.5}
    params["finetune"] |= {"mixup": 0.8, "cutmix": 1.0}  # the whole MAE recipe (the demo turns mixing off)
    params["finetune"] |= {"in_memory": False}  # the streaming loaders (the pipeline test runs the demo's in memory)
    params["seg_prepare"] |= {"fashion_mnist_dir": str(root / "fm"), "train_images": 16, "val_images": 6}
    params["seg_train"] |= {"checkpoint": ckpt, "epochs": 1, "batch_size": 8, "num_workers": 0}
    params["seg_eval"] |= {"overlays": 2, "num_workers": 0}
    run_stage("prepare", prepare.run, prepare.SECTIONS, root=root, params=params)
    return root, params


def test_every_stage_reads_an_official_checkpoint(project, monkeypatch):
    root, params = project
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root}/mlflow.db")
    m = run_stage("extract", extract.run, extract.SECTIONS, root=root, params=params)
    assert m["train_samples"] == 180 and m["dim_avg_last"] == 192 and m["dim_pixels"] == 3 * 28 * 28
    feats = torch.load(root / "data/features/pretrained.pt", weights_only=True)
    assert feats["train"]["avg_last4"].shape == (180, 768) and feats["meta"]["which"] == "target_encoder"

    m = run_stage("linprobe", linprobe.run, linprobe.SECTIONS, root=root, params=params)
    saved = json.loads((root / "metrics/linprobe.json").read_text())
    assert set(saved) >= {"top1", "top5", "random_init_top1", "pixels_top1", "best_head"}
    assert 0 <= saved["top1"] <= 1 and (root / "plots/linprobe.png").is_file()
    rows = (root / "metrics/linprobe_grid.csv").read_text().splitlines()
    assert len(rows) == 1 + 2 * (2 * 2 * 2) + 1 * 2 * 2  # header; (pretrained, random): poolings x lrs x bn; pixels

    toks = torch.load(root / "data/features/tokens_pretrained.pt", weights_only=True)
    assert toks["train"]["tokens"].shape == (180, 49, 192) and toks["train"]["tokens"].dtype == torch.float16
    assert toks["train"]["keys"] == feats["train"]["keys"]
    pix = torch.load(root / "data/features/tokens_pixels.pt", weights_only=True)
    assert pix["val"]["tokens"].shape == (20, 49, 3 * 4 * 4)  # the pixels' 4 x 4 patches

    m = run_stage("attnprobe", attnprobe.run, attnprobe.SECTIONS, root=root, params=params)
    saved = json.loads((root / "metrics/attnprobe.json").read_text())
    assert {"top1", "random_init_top1", "pixels_top1", "gap_vs_random_init"} <= set(saved)
    assert [r["head"] for r in saved["table"]["pixels"]] == ["attentive_lr0.001", "attentive_lr0.01"]
    assert (root / "plots/attnprobe.png").is_file()

    m = run_stage("lowshot", lowshot.run, lowshot.SECTIONS, root=root, params=params)
    saved = json.loads((root / "metrics/lowshot.json").read_text())
    assert list(saved) == ["10pct", "1shot", "3shot"] and set(saved["1shot"]) == {"pretrained", "random_init", "pixels"}
    assert saved["3shot"]["pixels"]["train_images"] == 30 and len(saved["1shot"]["pretrained"]["test_top1"]) == 2
    assert m["1shot_pretrained_mean"] == pytest.approx(saved["1shot"]["pretrained"]["mean"], abs=1e-5)
    assert (root / "plots/lowshot.png").is_file()

    m = run_stage("knn", knn.run, knn.SECTIONS, root=root, params=params)
    saved = json.loads((root / "metrics/knn.json").read_text())
    assert set(saved["top1"]) == {"k10", "k20", "k100", "k200"}

    m = run_stage("search", search.run, search.SECTIONS, root=root, params=params)
    assert set(m) >= {"recall@1", "recall@5", "map"} and m["gallery"] == 180
    assert (root / "models/search/index.pt").is_file() and (root / "plots/search_grid.png").is_file()

    m = run_stage("finetune", finetune.run, finetune.SECTIONS, root=root, params=params)
    saved = json.loads((root / "metrics/finetune.json").read_text())
    assert {"top1", "top5"} <= set(saved) and saved["best_epoch"] in (1, 2)
    from ijepa.finetune import load_classifier

    model, classes, pre = load_classifier(root / "models/finetune/classifier.pth")
    assert classes[0] == "T-shirt/top" and pre.crop_size == 28 and model.encoder.depth == 2

    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{root}/mlflow.db")
    runs = client.search_runs([client.get_experiment_by_name("ijepa").experiment_id])
    stages = {"prepare", "extract", "linprobe", "attnprobe", "lowshot", "knn", "search", "finetune"}
    assert {r.data.tags["ijepa.stage"] for r in runs} == stages
    ft = next(r for r in runs if r.data.tags["ijepa.stage"] == "finetune")
    assert [a.path for a in client.list_artifacts(ft.info.run_id, "params")] == ["params/resolved.json"]
    assert {a.path for a in client.list_artifacts(ft.info.run_id, "plots")} == {"plots/finetune.png"}


def test_search_command_queries_by_image_path(project, capsys):
    root, _ = project
    from ijepa.cli import main
    from ijepa.data import shard_urls
    from ijepa.data.loaders import read_images

    key = "00000003"
    img = read_images(shard_urls(root / "data/shards", "test"), [key])[key]
    from PIL import Image

    Image.fromarray(img.permute(1, 2, 0).numpy()).save(root / "query.png")
    assert (
        main(
            ["search", "--index", str(root / "models/search/index.pt"), "--query", str(root / "query.png"), "--k", "4"]
        )
        == 0
    )
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [x["rank"] for x in lines] == [1, 2, 3, 4]
    assert all(x["path"].startswith("fashion-mnist/train/") for x in lines)
    assert lines[0]["score"] >= lines[-1]["score"]


def test_bad_search_query_is_a_clear_error(project, capsys):
    root, _ = project
    from ijepa.cli import main

    assert main(["search", "--index", str(root / "models/search/index.pt"), "--query", str(root / "none.png")]) == 2
    assert "--query" in (err := capsys.readouterr().err) and "none.png is not a file" in err
    params = copy.deepcopy(yaml.safe_load((ROOT / "params.yaml").read_text()))
    params["extract"]["checkpoint"] = str(root / "missing.pth.tar")
    from ijepa.checkpoint import CheckpointError

    with pytest.raises(CheckpointError, match="missing.pth.tar does not exist"):
        run_stage(
            "extract",
            extract.run,
            extract.SECTIONS,
            root=root,
            params=params | {"tracking": params["tracking"] | {"enabled": False}},
        )


def test_segmentation_stages_on_an_official_checkpoint(project, monkeypatch):
    root, params = project
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root}/mlflow.db")
    m = run_stage("seg_prepare", seg_prepare.run, seg_prepare.SECTIONS, root=root, params=params)
    assert (m["train_pairs"], m["val_pairs"], m["classes"], m["unknown_pixels"]) == (16, 6, 11, 0)
    first = sorted((root / "data/seg/train/images").iterdir())[0].read_bytes()
    run_stage("seg_prepare", seg_prepare.run, seg_prepare.SECTIONS, root=root, params=params)
    assert sorted((root / "data/seg/train/images").iterdir())[0].read_bytes() == first  # deterministic by seed
    run_stage("seg_train", seg_train.run, seg_train.SECTIONS, root=root, params=params)
    assert {p.name for p in (root / "models/seg").iterdir()} == {"pretrained.pth", "random_init.pth"}
    run_stage("seg_eval", seg_eval.run, seg_eval.SECTIONS, root=root, params=params)
    saved = json.loads((root / "metrics/seg_eval.json").read_text())
    assert {"miou", "pixel_acc", "random_init_miou", "per_class_iou"} <= set(saved)
    assert 0 <= saved["miou"] <= 1 and set(saved["per_class_iou"]) >= {"background", "sneaker"}
    assert (root / "plots/seg_overlays.png").is_file() and (root / "plots/seg_iou.png").is_file()

    bad = copy.deepcopy(params)
    bad["seg_data"]["width"] = 83
    with pytest.raises(ParamError, match="seg_data.height/width"):
        run_stage("seg_train", seg_train.run, seg_train.SECTIONS, root=root, params=bad)


def test_attnprobe_without_a_token_cache_is_one_clear_line(tmp_path):
    """extract ran with extract.tokens false (or not at all): the error names the file and the setting."""
    import os
    import subprocess
    import sys

    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["tracking"]["enabled"] = False
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    r = subprocess.run(
        [sys.executable, "-m", "stages.attnprobe"], cwd=tmp_path, capture_output=True, text=True, timeout=120,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    last = r.stderr.strip().splitlines()[-1]
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert last.startswith("attnprobe: error: ") and "tokens_pretrained.pt not found" in last
    assert "extract.tokens: true" in last
