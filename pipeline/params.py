"""The params.yaml sections and their schemas. Stages parse only the sections they depend on."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import yaml

from ijepa.models.registry import list_models, preset

from .schema import ParamError, checked, fraction_range, non_negative, ordered_positive, parse, positive, spec_of


@dataclass(frozen=True)
class SourceParams:
    kind: Literal["fashion_mnist", "image_folder"]
    dir: str | None  # fashion_mnist: folder of the idx files (None: where `make setup` puts them)
    train_dir: str | None  # image_folder: <class>/<image> tree
    test_dir: str | None  # image_folder: optional held-out tree (ImageNet val)

    def validate(self):
        if self.kind == "image_folder" and not self.train_dir:
            yield "train_dir", "is required when source.kind is image_folder"


@dataclass(frozen=True)
class PrepareParams:
    source: SourceParams
    val_fraction: float = checked(lambda x: 0 <= x < 1, "be in [0, 1)")
    max_per_class: int | None = checked(positive, "be > 0 (or null for all)")
    test_max_per_class: int | None = checked(positive, "be > 0 (or null for all)")
    # training images per class past max_per_class, written as the `unlabeled` split (pretraining only)
    unlabeled_per_class: int | None = checked(non_negative, "be >= 0 (or null for all past max_per_class)")
    shard_size: int = checked(positive, "be > 0")
    workers: int = checked(positive, "be > 0")


@dataclass(frozen=True)
class DataParams:
    crop_size: int = checked(positive, "be > 0")
    patch_size: int = checked(positive, "be > 0")
    crop_scale: tuple[float, float] = checked(fraction_range, "satisfy 0 < min <= max <= 1")
    horizontal_flip: bool
    color_distortion: bool
    color_jitter: float = checked(non_negative, "be >= 0")
    gaussian_blur: bool
    num_workers: int = checked(non_negative, "be >= 0")
    stall_timeout_s: float = checked(non_negative, "be >= 0 (0: wait forever)")  # loader workers' silence
    shuffle_buffer: int = checked(positive, "be > 0")
    in_memory: bool  # decode the train split once and build batches in-process (small data sets)

    def validate(self):
        if self.crop_size % self.patch_size:
            yield "crop_size", f"must be divisible by data.patch_size={self.patch_size}, got {self.crop_size}"


@dataclass(frozen=True)
class ModelParams:
    name: str = checked(lambda n: n in list_models(), f"be one of {list_models()}")
    depth: int | None = checked(positive, "be > 0 (or null for the preset's depth)")
    pred_depth: int = checked(positive, "be > 0")
    pred_emb_dim: int = checked(positive, "be > 0")

    def validate(self):
        heads = preset(self.name)["num_heads"]
        if self.pred_emb_dim % heads:
            yield "pred_emb_dim", f"must be divisible by {self.name}'s {heads} heads, got {self.pred_emb_dim}"

    def overrides(self) -> dict:
        return {} if self.depth is None else {"depth": self.depth}

    def spec(self, data: DataParams, objective: ObjectiveParams):
        """The ``ijepa.pretrain.ModelSpec`` of these params on ``data``'s images."""
        from ijepa.pretrain import ModelSpec

        given = {"patch_size": data.patch_size, "img_size": data.crop_size, "in_chans": 3}
        return spec_of(self, ModelSpec, overrides=self.overrides(), objective=objective.spec(), **given)


@dataclass(frozen=True)
class MaskParams:
    enc_mask_scale: tuple[float, float] = checked(fraction_range, "satisfy 0 < min <= max <= 1")
    pred_mask_scale: tuple[float, float] = checked(fraction_range, "satisfy 0 < min <= max <= 1")
    aspect_ratio: tuple[float, float] = checked(ordered_positive, "satisfy 0 < min <= max")
    nenc: int = checked(positive, "be > 0")
    npred: int = checked(positive, "be > 0")
    min_keep: int = checked(non_negative, "be >= 0")
    allow_overlap: bool


@dataclass(frozen=True)
class OptimParams:
    warmup: float = checked(non_negative, "be >= 0 (epochs)")
    start_lr: float = checked(non_negative, "be >= 0")
    lr: float = checked(positive, "be > 0")
    final_lr: float = checked(non_negative, "be >= 0")
    weight_decay: float = checked(non_negative, "be >= 0")
    final_weight_decay: float = checked(non_negative, "be >= 0")
    ema: tuple[float, float] = checked(lambda e: 0 <= e[0] <= e[1] <= 1, "satisfy 0 <= start <= end <= 1")
    ipe_scale: float = checked(positive, "be > 0")
    bf16: bool
    ref_batch_size: int = checked(positive, "be > 0 (the effective batch the lrs above belong to)")
    lr_scaling: Literal["none", "linear", "sqrt"]  # the lrs at another effective batch

    def lr_scale(self, batch: int) -> float:
        """The factor on start_lr, lr and final_lr at effective batch ``batch`` (1.0 at ``ref_batch_size``)."""
        ratio = batch / self.ref_batch_size
        return {"none": 1.0, "linear": ratio, "sqrt": math.sqrt(ratio)}[self.lr_scaling]

    def batch_note(self, batch: int, ranks: int) -> str | None:
        """One line on an effective batch other than ``ref_batch_size`` and the lr it gets (None at the reference)."""
        if batch * ranks == self.ref_batch_size:
            return None
        scale = self.lr_scale(batch * ranks)
        return (
            f"effective batch {batch * ranks} ({batch} x {ranks} rank(s)) is not optim.ref_batch_size "
            f"{self.ref_batch_size}: lr {self.lr:g} x {scale:.4g} = {self.lr * scale:.4g} (optim.lr_scaling: "
            f"{self.lr_scaling})"
        )

    def spec(self, epochs: int, batch: int | None = None):
        """The ``ijepa.pretrain.OptimSpec`` of these params over ``epochs``, its lrs scaled to effective batch
        ``batch`` by ``lr_scaling`` (None: as written)."""
        from ijepa.pretrain import OptimSpec

        scale = 1.0 if batch is None else self.lr_scale(batch)
        lrs = {k: getattr(self, k) * scale for k in ("start_lr", "lr", "final_lr")}
        return spec_of(self, OptimSpec, epochs=epochs, **lrs)


@dataclass(frozen=True)
class MonitorParams:
    """Health monitors of the target encoder during pretraining (``ijepa.monitor``)."""

    enabled: bool
    every: int = checked(non_negative, "be >= 0 (steps; 0: only at epoch ends)")
    bank: int = checked(positive, "be > 0 (training images, the k-NN bank)")
    queries: int = checked(positive, "be > 0 (validation images)")
    k: int = checked(positive, "be > 0")
    min_rank: float = checked(non_negative, "be >= 0 (0: never warn)")
    grace_epochs: float = checked(non_negative, "be >= 0 (epochs before min_rank applies)")
    stop_on_collapse: bool


@dataclass(frozen=True)
class PretrainParams:
    epochs: int = checked(positive, "be > 0")
    batch_size: int = checked(positive, "be > 0 (per rank)")
    device: Literal["auto", "cuda", "mps", "cpu"]
    save_every_epochs: int = checked(non_negative, "be >= 0")
    monitor: MonitorParams
    log_model: bool  # the target encoder as an MLflow model, registered as ijepa-encoder
    splits: tuple[str, ...] = checked(
        lambda v: len(v) > 0 and len(set(v)) == len(v), "name each split once, at least one"
    )  # the shards' splits pretraining reads: train, and unlabeled where prepare.unlabeled_per_class wrote it


@dataclass(frozen=True)
class LauncherParams:
    """Where a distributed stage runs (``pipeline.launch``). Only the world size (nodes x tasks_per_node) changes
    what is trained: dvc.yaml lists those two keys as the stages' params, and none of the others."""

    kind: Literal["inline", "local", "slurm"]
    nodes: int = checked(positive, "be > 0")
    tasks_per_node: int = checked(positive, "be > 0")
    gpus_per_node: int = checked(non_negative, "be >= 0")
    cpus_per_task: int = checked(positive, "be > 0")
    mem_gb: int = checked(positive, "be > 0")
    time_min: int = checked(positive, "be > 0 (minutes)")
    partition: str | None
    account: str | None
    max_requeues: int = checked(non_negative, "be >= 0")
    signal_delay_s: int = checked(positive, "be > 0 (seconds of warning before the time limit)")
    folder: str
    poll_s: float = checked(positive, "be > 0 (seconds between looks at a job's state)")


@dataclass(frozen=True)
class TrackingParams:
    experiment: str = checked(lambda s: bool(s.strip()), "be a non-empty name")
    enabled: bool
    model_alias: str | None = checked(
        lambda s: re.fullmatch(r"[\w-]+", s) is not None and s.lower() != "latest",
        "be letters, digits, _ or - (not 'latest', which MLflow reserves), or null",
    )


def load_params(path: str | Path) -> dict:
    """Read params.yaml (a clear error naming the file when it is missing or not a mapping)."""
    path = Path(path)
    if not path.is_file():
        raise ParamError(f"{path}: params file not found")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ParamError(f"{path}: not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ParamError(f"{path}: expected a mapping of sections at the top level")
    return data


def section(params: dict, name: str):
    """Parse and validate one section (``seed`` is an int >= 0)."""
    if name not in params:
        raise ParamError(f"{name}: section missing from params.yaml")
    if name == "seed":
        seed = params["seed"]
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ParamError(f"seed: must be an integer >= 0, got {seed!r}")
        return seed
    return parse(SECTIONS[name], params[name], name)


def mask_collator(mask: MaskParams, data: DataParams, *, seed: int = 0, rank: int = 0):
    """The library's ``MultiBlockMaskCollator`` for these params sections (config -> explicit arguments)."""
    from ijepa.masks import MultiBlockMaskCollator

    return MultiBlockMaskCollator(
        data.crop_size,
        data.patch_size,
        enc_mask_scale=mask.enc_mask_scale,
        pred_mask_scale=mask.pred_mask_scale,
        aspect_ratio=mask.aspect_ratio,
        nenc=mask.nenc,
        npred=mask.npred,
        min_keep=mask.min_keep,
        allow_overlap=mask.allow_overlap,
        seed=seed,
        rank=rank,
    )


def check_mask_geometry(mask: MaskParams, data: DataParams) -> None:
    """Masks that cannot be drawn on the token grid are a params error naming ``mask``."""
    try:
        mask_collator(mask, data)
    except ValueError as e:
        raise ParamError(f"mask: {e}") from e


@dataclass(frozen=True)
class ExtractParams:
    checkpoint: str  # ours, or an official .pth.tar
    which: Literal["target_encoder", "encoder"]
    crop_size: int | None = checked(positive, "be > 0 (or null for the checkpoint's image size)")
    resize_size: int | None = checked(positive, "be > 0 (or null for the crop size)")
    batch_size: int = checked(positive, "be > 0")
    num_workers: int = checked(non_negative, "be >= 0")
    stall_timeout_s: float = checked(non_negative, "be >= 0 (0: wait forever)")
    pixel_size: int = checked(positive, "be > 0")
    tokens: bool  # also keep the last layer's patch tokens (float16) for the attentive probe
    bf16: bool
    device: Literal["auto", "cuda", "mps", "cpu"]


@dataclass(frozen=True)
class LinprobeParams:
    lrs: tuple[float, ...] = checked(lambda v: len(v) > 0 and min(v) > 0, "be positive")
    poolings: tuple[str, ...] = checked(
        lambda v: len(v) > 0 and set(v) <= {"avg_last", "avg_last4"}, "be a non-empty subset of [avg_last, avg_last4]"
    )
    batchnorm: tuple[bool, ...] = checked(lambda v: len(v) > 0, "be a non-empty list")
    epochs: int = checked(positive, "be > 0")
    batch_size: int = checked(positive, "be > 0")
    weight_decay: float = checked(non_negative, "be >= 0")


@dataclass(frozen=True)
class AttnprobeParams:
    enabled: bool  # false: the stage records that it did not run (no token cache at ImageNet scale)
    lrs: tuple[float, ...] = checked(lambda v: len(v) > 0 and min(v) > 0, "be positive")
    num_heads: int = checked(positive, "be > 0 (fewer where they do not divide the token width)")
    epochs: int = checked(positive, "be > 0")
    batch_size: int = checked(positive, "be > 0")
    weight_decay: float = checked(non_negative, "be >= 0")
    warmup_epochs: float = checked(non_negative, "be >= 0")
    device: Literal["auto", "cuda", "mps", "cpu"]


@dataclass(frozen=True)
class LowshotParams:
    shots: tuple[int, ...] = checked(lambda v: all(k > 0 for k in v), "be positive")
    fractions: tuple[float, ...] = checked(lambda v: all(0 < f <= 1 for f in v), "be in (0, 1]")
    subsets: int = checked(positive, "be > 0 (seeded training subsets per protocol)")
    poolings: tuple[str, ...] = checked(
        lambda v: len(v) > 0 and set(v) <= {"avg_last", "avg_last4"}, "be avg_last / avg_last4"
    )
    lrs: tuple[float, ...] = checked(lambda v: len(v) > 0 and min(v) > 0, "be positive")
    batchnorm: tuple[bool, ...] = checked(lambda v: len(v) > 0, "be a non-empty list")
    epochs: int = checked(positive, "be > 0")
    batch_size: int = checked(positive, "be > 0")


@dataclass(frozen=True)
class KnnParams:
    ks: tuple[int, ...] = checked(lambda v: len(v) > 0 and min(v) > 0, "be positive")
    temperature: float = checked(positive, "be > 0")
    pooling: Literal["avg_last", "avg_last4"]


@dataclass(frozen=True)
class SearchParams:
    pooling: Literal["avg_last", "avg_last4"]
    backend: Literal["exact", "faiss"]
    k: int = checked(positive, "be > 0")
    grid_queries: int = checked(positive, "be > 0")


@dataclass(frozen=True)
class FinetuneParams:
    checkpoint: str
    which: Literal["target_encoder", "encoder"]
    epochs: int = checked(positive, "be > 0")
    batch_size: int = checked(positive, "be > 0")
    accum_steps: int = checked(positive, "be > 0")
    blr: float = checked(positive, "be > 0")
    min_lr: float = checked(non_negative, "be >= 0")
    warmup_epochs: float = checked(non_negative, "be >= 0")
    weight_decay: float = checked(non_negative, "be >= 0")
    layer_decay: float = checked(lambda x: 0 < x <= 1, "be in (0, 1]")
    drop_path: float = checked(lambda x: 0 <= x < 1, "be in [0, 1)")
    label_smoothing: float = checked(lambda x: 0 <= x < 1, "be in [0, 1)")
    mixup: float = checked(non_negative, "be >= 0 (0 = off)")
    cutmix: float = checked(non_negative, "be >= 0 (0 = off)")
    rand_augment: float = checked(lambda x: 0 <= x <= 10, "be in [0, 10], timm's scale (0 = off)")
    random_erasing: float = checked(lambda x: 0 <= x <= 1, "be in [0, 1] (0 = off)")
    crop_scale: tuple[float, float] = checked(fraction_range, "satisfy 0 < min <= max <= 1")
    horizontal_flip: bool
    resize_size: int | None = checked(positive, "be > 0 (or null for the crop size)")
    model_ema: bool
    ema_decay: float = checked(lambda x: 0 < x < 1, "be in (0, 1)")
    bf16: bool
    num_workers: int = checked(non_negative, "be >= 0")
    stall_timeout_s: float = checked(non_negative, "be >= 0 (0: wait forever)")
    in_memory: bool  # decode every split once and build batches in-process (small data sets)
    device: Literal["auto", "cuda", "mps", "cpu"]
    log_model: bool  # the classifier as an MLflow model, registered as ijepa-classifier
    random_init: bool  # also train the architecture from a random start, same recipe (the baseline)
    lp_steps: int = checked(non_negative, "be >= 0 (0: MAE's random head)")  # LP-FT: fit the head first
    lp_lr: float = checked(positive, "be > 0")

    def spec(self):
        """The ``ijepa.finetune.FinetuneSpec`` of these params."""
        from ijepa.finetune import FinetuneSpec

        return spec_of(self, FinetuneSpec)


@dataclass(frozen=True)
class DmtParams:
    window: int = checked(lambda w: w >= 3 and w % 2 == 1, "be an odd number >= 3")
    k: int = checked(positive, "be > 0")
    blocks: int = checked(positive, "be > 0")

    def validate(self):
        if self.k > self.window**2 - 1:
            yield (
                "k",
                f"must be at most window^2 - 1 = {self.window**2 - 1} (the patch itself is excluded), got {self.k}",
            )


@dataclass(frozen=True)
class ObjectiveParams:
    name: Literal["ijepa", "dmt_jepa"]
    dmt: DmtParams | None

    def validate(self):
        if self.name == "dmt_jepa" and self.dmt is None:
            yield "dmt", "is required when objective.name is dmt_jepa (window, k, blocks)"

    def spec(self) -> dict:
        """The ``ModelSpec.objective`` mapping."""
        if self.name == "ijepa":
            return {"name": "ijepa"}
        return {"name": "dmt_jepa", "window": self.dmt.window, "k": self.dmt.k, "depth": self.dmt.blocks}


@dataclass(frozen=True)
class SegPrepareParams:
    kind: Literal["demo", "folders"]  # demo: generate scenes into data/seg; folders: use seg_data dirs
    fashion_mnist_dir: str | None  # demo items (None: where `make setup` puts Fashion-MNIST)
    train_images: int = checked(positive, "be > 0")
    val_images: int = checked(positive, "be > 0")
    height: int = checked(positive, "be > 0")
    width: int = checked(positive, "be > 0")
    items: tuple[int, int] = checked(ordered_positive, "satisfy 0 < min <= max")
    item_scale: tuple[float, float] = checked(ordered_positive, "satisfy 0 < min <= max")


@dataclass(frozen=True)
class SegDataParams:
    train_dir: str  # <dir>/images/<stem>.* and <dir>/masks/<stem>.png
    val_dir: str
    mask_format: Literal["color", "index"]
    classes: str  # ALL_CLASSES, LABEL_COLORS_LIST, VIS_LABEL_MAP (+ IGNORE_COLORS)
    height: int = checked(positive, "be > 0")  # model input (multiples of the patch size)
    width: int = checked(positive, "be > 0")


@dataclass(frozen=True)
class SegTrainParams:
    checkpoint: str
    which: Literal["target_encoder", "encoder"]
    head: Literal["linear", "decoder"]
    layers: int = checked(positive, "be > 0 (the last N blocks, concatenated)")
    decoder_width: int = checked(positive, "be > 0")
    freeze_encoder: bool
    epochs: int = checked(positive, "be > 0")
    batch_size: int = checked(positive, "be > 0")
    lr: float = checked(positive, "be > 0")
    min_lr: float = checked(non_negative, "be >= 0")
    weight_decay: float = checked(non_negative, "be >= 0")
    warmup_epochs: float = checked(non_negative, "be >= 0")
    schedule: Literal["poly", "cosine"]
    encoder_lr_scale: float = checked(positive, "be > 0")
    scale: tuple[float, float] = checked(ordered_positive, "satisfy 0 < min <= max")
    hflip: bool
    bf16: bool
    num_workers: int = checked(non_negative, "be >= 0")
    device: Literal["auto", "cuda", "mps", "cpu"]
    log_model: bool  # the pretrained-encoder segmenter as an MLflow model, registered as ijepa-segmenter

    def spec(self):
        """The ``ijepa.seg.train.SegTrainSpec`` of these params."""
        from ijepa.seg.train import SegTrainSpec

        return spec_of(self, SegTrainSpec, library_defaults=("poly_power",))  # mmseg's 0.9, not a param


@dataclass(frozen=True)
class SegEvalParams:
    batch_size: int = checked(positive, "be > 0")
    overlays: int = checked(non_negative, "be >= 0 (validation images drawn with their predictions)")
    num_workers: int = checked(non_negative, "be >= 0")
    device: Literal["auto", "cuda", "mps", "cpu"]


SECTIONS = {  # params.yaml's section -> its schema (a stage parses the sections it names)
    "prepare": PrepareParams,
    "data": DataParams,
    "model": ModelParams,
    "mask": MaskParams,
    "optim": OptimParams,
    "objective": ObjectiveParams,
    "pretrain": PretrainParams,
    "launcher": LauncherParams,
    "tracking": TrackingParams,
    "extract": ExtractParams,
    "linprobe": LinprobeParams,
    "attnprobe": AttnprobeParams,
    "lowshot": LowshotParams,
    "knn": KnnParams,
    "search": SearchParams,
    "finetune": FinetuneParams,
    "seg_prepare": SegPrepareParams,
    "seg_data": SegDataParams,
    "seg_train": SegTrainParams,
    "seg_eval": SegEvalParams,
}
