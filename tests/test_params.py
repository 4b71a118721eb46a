"""Params: composition from params/ equals the committed params.yaml; typed validation names the key."""

from __future__ import annotations

import copy
import dataclasses
import typing
from pathlib import Path

import pytest
import yaml

from pipeline.params import SECTIONS, check_mask_geometry, load_params, section
from pipeline.schema import ParamError
from pipeline.stage import run_stage
from scripts.compose_params import compose

ROOT = Path(__file__).resolve().parent.parent


def composed(tmp_path: Path, *overrides: str) -> dict:
    out = tmp_path / "params.yaml"
    compose(out, list(overrides))
    return yaml.safe_load(out.read_text())


def test_committed_params_yaml_is_up_to_date(tmp_path):
    compose(tmp_path / "params.yaml", [])
    assert (tmp_path / "params.yaml").read_text() == (ROOT / "params.yaml").read_text(), (
        "params.yaml is stale: run `make params` after editing params/"
    )


@pytest.mark.parametrize(
    "overrides",
    [
        [],
        ["model=vit_small"],
        ["model=vit_giant"],
        ["experiment=debug"],
        ["experiment=in1k_vith14_ep300"],
        ["mask=paper", "data=imagenet_224_16", "optim=paper"],
        ["launcher=slurm", "launcher.nodes=4"],
        ["objective=dmt_jepa"],
        ["objective=dmt_jepa", "objective.dmt.window=5", "objective.dmt.k=24"],
    ],
)
def test_every_group_option_composes_and_validates(tmp_path, overrides):
    params = composed(tmp_path, *overrides)
    for name in ["seed", *SECTIONS]:
        section(params, name)
    check_mask_geometry(section(params, "mask"), section(params, "data"))


def test_official_overlay_matches_the_official_config(tmp_path):
    p = composed(tmp_path, "experiment=in1k_vith14_ep300")
    assert p["model"] == {"name": "vit_huge", "depth": None, "pred_depth": 12, "pred_emb_dim": 384}
    assert (p["data"]["crop_size"], p["data"]["patch_size"]) == (224, 14)
    assert p["mask"]["min_keep"] == 10 and p["optim"]["warmup"] == 40 and p["optim"]["ema"] == [0.996, 1.0]
    assert p["pretrain"]["batch_size"] * p["launcher"]["nodes"] * p["launcher"]["tasks_per_node"] == 2048
    # launched as written, the paper's effective batch at the paper's lr, as SLURM jobs
    optim, launcher = section(p, "optim"), section(p, "launcher")
    assert (optim.ref_batch_size, optim.lr, launcher.kind) == (2048, 0.001, "slurm")
    assert optim.lr_scale(2048) == 1.0 and optim.batch_note(128, 16) is None
    assert optim.spec(300, 2048).lr == 0.001 and optim.spec(300, 1024).lr == pytest.approx(0.001 / 2**0.5)
    assert optim.batch_note(128, 8) == (
        "effective batch 1024 (128 x 8 rank(s)) is not optim.ref_batch_size 2048: lr 0.001 x 0.7071 = 0.0007071 "
        "(optim.lr_scaling: sqrt)"
    )


def test_the_demo_runs_inline_at_its_reference_batch():
    p = load_params(ROOT / "params.yaml")
    launcher, optim, pre = section(p, "launcher"), section(p, "optim"), section(p, "pretrain")
    assert (launcher.kind, launcher.nodes, launcher.tasks_per_node) == ("inline", 1, 1)
    assert optim.ref_batch_size == pre.batch_size and optim.spec(pre.epochs, pre.batch_size).lr == optim.lr
    linear = dataclasses.replace(optim, lr_scaling="linear")
    assert linear.spec(1, 2 * pre.batch_size).start_lr == 2 * optim.start_lr
    assert dataclasses.replace(optim, lr_scaling="none").lr_scale(8 * pre.batch_size) == 1.0


def test_official_overlay_evaluates_as_on_imagenet(tmp_path):
    """ImageNet evaluation settings, not the 28-px demo's: resize 256 then centre 224, ImageNet crops and the
    paper's finetuning drop path, RandAugment and RandomErasing as MAE's recipe."""
    p = composed(tmp_path, "experiment=in1k_vith14_ep300")
    ext, ft = section(p, "extract"), section(p, "finetune")
    assert (ext.crop_size, ext.resize_size) == (224, 256)
    assert ft.resize_size == 256 and tuple(ft.crop_scale) == (0.08, 1.0)
    assert ft.drop_path == 0.25 and ft.weight_decay == 0.04 and ft.layer_decay == 0.75 and ft.label_smoothing == 0.1
    assert (ft.rand_augment, ft.random_erasing, ft.mixup, ft.cutmix) == (9, 0.25, 0.8, 1.0)


BASE = load_params(ROOT / "params.yaml")


def broken(path: str, value):
    p = copy.deepcopy(BASE)
    *parents, leaf = path.split(".")
    node = p
    for k in parents:
        node = node[k]
    if value is KeyError:
        del node[leaf]
    else:
        node[leaf] = value
    return p


@pytest.mark.parametrize(
    ("path", "value", "message"),
    [
        ("optim.lrr", 0.1, r"optim\.lrr: unknown key \(valid keys: warmup, start_lr, lr"),
        ("optim.lr", "fast", r"optim\.lr: expected a number, got str 'fast'"),
        ("optim.lr", -0.001, r"optim\.lr: must be > 0, got -0\.001"),
        ("optim.lr", float("inf"), r"optim\.lr: must be a finite number, got inf"),
        ("optim.weight_decay", float("nan"), r"optim\.weight_decay: must be a finite number, got nan"),
        ("mask.pred_mask_scale", [0.15, float("nan")], r"mask\.pred_mask_scale\[1\]: must be a finite number"),
        ("mask.pred_mask_scale", [0.15, 1.2], r"mask\.pred_mask_scale: must satisfy 0 < min <= max <= 1"),
        ("mask.npred", 2.5, r"mask\.npred: expected an integer, got float 2\.5"),
        ("data.patch_size", 16, r"data\.crop_size: must be divisible by data\.patch_size=16, got 28"),
        ("data.horizontal_flip", 1, r"data\.horizontal_flip: expected bool, got int 1"),
        ("model.name", "vit_mega", r"model\.name: must be one of \['vit_tiny'"),
        ("model.pred_emb_dim", 100, r"model\.pred_emb_dim: must be divisible by vit_tiny's 3 heads"),
        ("pretrain.device", "tpu", r"pretrain\.device: must be one of \['auto', 'cuda', 'mps', 'cpu'\]"),
        ("pretrain.epochs", KeyError, r"pretrain\.epochs: missing \(every key must be set"),
        ("prepare.source.kind", "imagenet", r"prepare\.source\.kind: must be one of"),
        ("optim.ema", [0.996], r"optim\.ema: expected a list of 2 values"),
        ("seed", -1, r"seed: must be an integer >= 0"),
        ("objective.name", "dmt_jepa", r"objective\.dmt: is required when objective\.name is dmt_jepa"),
        ("objective.dmt", {"window": 4, "k": 4, "blocks": 2}, r"objective\.dmt\.window: must be an odd number >= 3"),
        ("objective.dmt", {"window": 3, "k": 9, "blocks": 2}, r"objective\.dmt\.k: must be at most window\^2 - 1 = 8"),
    ],
)
def test_validation_names_the_key(path, value, message):
    params = broken(path, value)
    name = path.split(".")[0]
    with pytest.raises(ParamError, match=message):
        section(params, name)


def test_missing_required_and_impossible_masks():
    p = copy.deepcopy(BASE)
    del p["prepare"]["source"]
    with pytest.raises(ParamError, match=r"prepare\.source: missing"):
        section(p, "prepare")
    with pytest.raises(ParamError, match="pretrain: section missing"):
        section({"seed": 0}, "pretrain")
    p = broken("mask.min_keep", 12)
    with pytest.raises(ParamError, match=r"mask: pred_mask_scale=\[0\.15, 0\.2\] on a 7x7 patch grid"):
        check_mask_geometry(section(p, "mask"), section(p, "data"))
    p = broken("prepare.source.kind", "image_folder")
    with pytest.raises(ParamError, match=r"prepare\.source\.train_dir: is required"):
        section(p, "prepare")


def test_stage_validates_before_any_work(tmp_path):
    from stages import pretrain

    params = broken("optim.lr", -1.0)
    with pytest.raises(ParamError, match=r"optim\.lr"):
        run_stage("pretrain", pretrain.run, pretrain.SECTIONS, root=tmp_path, params=params)
    assert list(tmp_path.iterdir()) == []  # nothing written, no tracking store created


def test_the_schema_holds_no_values_and_every_spec_field_comes_from_a_param():
    """params/ is the one source of values: no schema field has a default to disagree with it, and each
    library spec a stage builds gets every field from a param (or names it as deliberately the library's)."""
    from pipeline.schema import spec_of

    def walk(cls):
        for f in dataclasses.fields(cls):
            assert f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING, (cls, f.name)
            for tp in typing.get_args(typing.get_type_hints(cls)[f.name]) or (typing.get_type_hints(cls)[f.name],):
                if dataclasses.is_dataclass(tp):
                    walk(tp)

    for cls in SECTIONS.values():
        walk(cls)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    data, objective = section(params, "data"), section(params, "objective")
    pre = section(params, "pretrain")
    built = [
        section(params, "model").spec(data, objective),
        section(params, "optim").spec(pre.epochs, pre.batch_size),
        section(params, "finetune").spec(),
        section(params, "seg_train").spec(),
    ]
    assert built[1].epochs == pre.epochs and built[2].blr == params["finetune"]["blr"]
    assert built[3].poly_power == 0.9  # the one field left at the library's value, by name

    @dataclasses.dataclass(frozen=True)
    class NewSpec:
        blr: float = 1.0
        a_new_knob: int = 3

    with pytest.raises(TypeError, match="NewSpec: no param sets a_new_knob"):
        spec_of(section(params, "finetune"), NewSpec)
