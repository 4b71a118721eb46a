"""Full finetuning with the MAE recipe: AdamW, lr scaled by batch size, warmup then cosine, layer-wise lr
decay, stochastic depth, RandAugment at timm's strength and RandomErasing, MixUp/CutMix with label
smoothing, real gradient accumulation, optional model EMA, bf16 autocast (CUDA or CPU), DDP. Upstream's
scheduler sets one lr for every group, which is why the forks could not decay layer-wise; here each param
group carries an ``lr_scale``.
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.transforms import v2

from .checkpoint import CheckpointError, atomic_save, load_state_strict, read_checkpoint
from .data.augment import random_erasing
from .device import autocast
from .distributed import all_reduce_mean, all_reduce_sum, unwrap
from .engine import NonFiniteLossError
from .epochs import EpochLoop
from .models.vit import VisionTransformer
from .schedules import warmup_cosine

CLASSIFIER_FORMAT = "ijepa-classifier"


class Classifier(nn.Module):
    """Encoder -> average of the patch tokens -> LayerNorm -> Linear (I-JEPA has no class token)."""

    def __init__(self, encoder: VisionTransformer, num_classes: int):
        super().__init__()
        self.encoder = encoder
        self.fc_norm = nn.LayerNorm(encoder.embed_dim, eps=1e-6)
        self.head = nn.Linear(encoder.embed_dim, num_classes)
        nn.init.trunc_normal_(self.head.weight, std=2e-5)  # MAE's head init
        nn.init.zeros_(self.head.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) normalised images -> (B, num_classes) logits."""
        return self.head(self.fc_norm(self.encoder(x).mean(dim=1)))


def layer_id(name: str, depth: int) -> int:
    """0 for the embeddings, i + 1 for ``blocks.i``, depth + 1 for the final norms and the head."""
    if name.startswith(("encoder.patch_embed", "encoder.pos_embed")):
        return 0
    if name.startswith("encoder.blocks."):
        return int(name.split(".")[2]) + 1
    return depth + 1


def param_groups_lrd(model: Classifier, weight_decay: float, layer_decay: float) -> list[dict]:
    """AdamW groups with ``lr_scale = layer_decay ** (depth + 1 - layer_id)``; no decay on biases / 1-D."""
    depth = model.encoder.depth
    groups: dict[tuple[int, bool], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        lid = layer_id(name, depth)
        decay = p.ndim > 1 and not name.endswith(".bias")
        g = groups.setdefault(
            (lid, decay),
            {
                "params": [],
                "names": [],
                "weight_decay": weight_decay if decay else 0.0,
                "lr_scale": layer_decay ** (depth + 1 - lid),
                "layer": lid,
            },
        )
        g["params"].append(p)
        g["names"].append(name)
    return [groups[k] for k in sorted(groups)]


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for g in optimizer.param_groups:
        g["lr"] = lr * g.get("lr_scale", 1.0)


class MixTargets:
    """MixUp (alpha 0.8) or CutMix (alpha 1.0), chosen per batch, then label smoothing on the soft targets."""

    def __init__(self, num_classes: int, mixup: float, cutmix: float, label_smoothing: float):
        self.num_classes, self.smoothing = num_classes, label_smoothing
        ops = [t for a, t in ((mixup, v2.MixUp), (cutmix, v2.CutMix)) if a > 0]
        alphas = [a for a in (mixup, cutmix) if a > 0]
        self.mix = (
            v2.RandomChoice([t(alpha=a, num_classes=num_classes) for t, a in zip(ops, alphas, strict=True)])
            if ops
            else None
        )

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.mix is not None:
            images, soft = self.mix(images, labels)
        else:
            soft = F.one_hot(labels, self.num_classes).float()
        return images, soft * (1 - self.smoothing) + self.smoothing / self.num_classes


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return torch.sum(-targets * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()


def accumulate_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    micro_batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
    *,
    device: torch.device,
    bf16: bool = False,
) -> float:
    """One optimizer step over several micro-batches of (images, soft targets): gradients of the mean loss
    are accumulated exactly as one batch of their union would give (equal micro-batch sizes).

    Returns:
        the mean loss.
    """
    total = sum(len(x) for x, _ in micro_batches)
    optimizer.zero_grad(set_to_none=True)
    loss_sum = 0.0
    for i, (x, t) in enumerate(micro_batches):
        # under DDP only the last micro-batch's backward averages the accumulated gradients over ranks
        last = i == len(micro_batches) - 1
        with model.no_sync() if hasattr(model, "no_sync") and not last else contextlib.nullcontext():
            with autocast(device, bf16):
                loss = soft_cross_entropy(model(x), t)
            (loss * len(x) / total).backward()
        loss_sum += float(loss.detach()) * len(x)
    optimizer.step()
    return loss_sum / total


@torch.no_grad()
def update_ema(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """Model EMA of the parameters (the classifier has no buffers)."""
    for e, m in zip(ema.parameters(), model.parameters(), strict=True):
        e.mul_(decay).add_(m.detach(), alpha=1 - decay)


@torch.no_grad()
def evaluate(model: nn.Module, batches: Iterable, *, prepare, device: torch.device, bf16: bool = False) -> dict:
    """Top-1 / top-5 accuracy and mean loss over (images, labels, keys) batches; under torch.distributed each
    rank passes its own share of the samples and gets the totals over all ranks."""
    model.eval()
    n = c1 = c5 = 0
    loss = 0.0
    for imgs, labels, _ in batches:
        labels = torch.as_tensor(labels).to(device)
        with autocast(device, bf16):
            logits = model(prepare(imgs)).float()
        loss += float(F.cross_entropy(logits, labels, reduction="sum"))
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        c1 += int((top[:, 0] == labels).sum())
        c5 += int((top == labels[:, None]).any(1).sum())
        n += len(labels)
    n, c1, c5, loss = all_reduce_sum(torch.tensor([n, c1, c5, loss], dtype=torch.float64, device=device)).tolist()
    if n == 0:
        raise ValueError("evaluate got no samples")
    return {"top1": c1 / n, "top5": c5 / n, "loss": loss / n}


def fit_head(
    model: nn.Module,
    batches: Iterable,
    *,
    prepare,
    device: torch.device,
    steps: int,
    lr: float,
    weight_decay: float = 0.0,
    bf16: bool = False,
) -> dict:
    """LP-FT's first phase (Kumar et al., 2022, "Fine-Tuning can Distort Pretrained Features"): the classifier's
    head fitted on the frozen encoder's pooled, normed features before the whole network is finetuned, so that
    finetuning starts from a linear probe instead of a random head whose large early gradients reach the encoder.

    The features of ``batches`` (this rank's share of the unaugmented training split: (images, labels, keys))
    are computed once in eval mode; the head then takes ``steps`` full-batch AdamW steps on the mean
    cross-entropy, its gradients summed over ranks, so every rank ends with the same head as one process would.
    Nothing else is touched and no random number is drawn (a resumed run repeats it exactly).

    Returns:
        {"train_top1", "train_loss"} of the fitted head on those features (over all ranks).
    """
    core = unwrap(model)
    core.eval()
    feats, targets = [], []
    with torch.no_grad():
        for imgs, labels, _ in batches:
            with autocast(device, bf16):
                tokens = core.encoder(prepare(imgs))
            feats.append(core.fc_norm(tokens.float().mean(dim=1)))
            targets.append(torch.as_tensor(labels).to(device))
    dim = core.head.in_features  # a rank may hold no sample of a tiny split
    x = torch.cat(feats) if feats else torch.zeros(0, dim, device=device)
    y = torch.cat(targets) if targets else torch.zeros(0, dtype=torch.long, device=device)
    n = float(all_reduce_sum(torch.tensor([len(y)], dtype=torch.float64, device=device))[0])
    if n == 0:
        raise ValueError("fit_head got no samples")
    head = core.head
    optimizer = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        (F.cross_entropy(head(x), y, reduction="sum") / n).backward()
        for param in head.parameters():
            param.grad = all_reduce_sum(param.grad)
        optimizer.step()
    with torch.no_grad():
        logits = head(x)
        loss, correct = F.cross_entropy(logits, y, reduction="sum"), (logits.argmax(1) == y).sum()
    loss, correct = all_reduce_sum(torch.stack([loss.double(), correct.double()])).tolist()
    return {"train_top1": correct / n, "train_loss": loss / n}


@dataclass(frozen=True)
class Preprocess:
    """What a classifier's inputs go through (stored with it, so inference matches training)."""

    crop_size: int
    resize_size: int
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)


def save_classifier(
    path: str | Path, model: Classifier, class_names: Sequence[str], preprocess: Preprocess, **info
) -> None:
    """Atomic save: weights, encoder architecture, class names and preprocessing (weights-only loadable)."""
    atomic_save(
        {
            "format": CLASSIFIER_FORMAT,
            "format_version": 1,
            "model": model.state_dict(),
            "encoder_arch": model.encoder.arch(),
            "class_names": list(class_names),
            "preprocess": {
                "crop_size": preprocess.crop_size,
                "resize_size": preprocess.resize_size,
                "mean": list(preprocess.mean),
                "std": list(preprocess.std),
            },
            "info": info,
        },
        path,
    )


def load_classifier(path: str | Path) -> tuple[Classifier, list[str], Preprocess]:
    """Rebuild a classifier from its file alone; returns (model in eval mode, class names, preprocessing)."""
    ckpt = read_checkpoint(path)
    if ckpt.get("format") != CLASSIFIER_FORMAT:
        raise CheckpointError(
            f"{path} is not a finetuned classifier (format {ckpt.get('format')!r}); "
            "pretraining checkpoints have no classification head: run the finetune stage"
        )
    model = Classifier(VisionTransformer(**ckpt["encoder_arch"]), len(ckpt["class_names"]))
    load_state_strict(model, ckpt["model"], f"{path} [model]")
    pp = ckpt["preprocess"]
    return (
        model.eval(),
        list(ckpt["class_names"]),
        Preprocess(pp["crop_size"], pp["resize_size"], tuple(pp["mean"]), tuple(pp["std"])),
    )


def with_drop_path(encoder: VisionTransformer, rate: float) -> VisionTransformer:
    """A copy of ``encoder`` whose blocks use stochastic depth (rates rising linearly to ``rate``)."""
    new = VisionTransformer(**encoder.arch(), drop_path_rate=rate)
    new.load_state_dict(encoder.state_dict())
    return new


def ema_copy(model: nn.Module) -> nn.Module:
    ema = copy.deepcopy(model)
    ema.requires_grad_(False)
    return ema


@dataclass(frozen=True, kw_only=True)  # by keyword only: no silent swap of two numbers
class FinetuneSpec:
    """The recipe; lr = blr x effective batch / 256 (MAE's rule)."""

    epochs: int = 50
    batch_size: int = 64  # per micro-batch and rank
    accum_steps: int = 1
    blr: float = 1e-3
    min_lr: float = 1e-6
    warmup_epochs: float = 5
    weight_decay: float = 0.05
    layer_decay: float = 0.75
    label_smoothing: float = 0.1
    mixup: float = 0.8
    cutmix: float = 1.0
    model_ema: bool = False
    ema_decay: float = 0.9999
    bf16: bool = True
    random_erasing: float = 0.25  # MAE's reprob: per-image probability of one noise-filled box


def finetune_epoch(model, optimizer, batches, spec, mix, ema, lr_at, step: int, prepare, device, progress=None):
    """One epoch of optimizer steps, each over ``spec.accum_steps`` micro-batches (RandomErasing, then
    MixUp/CutMix): the lr is ``lr_at(step)``, the loss is averaged over ranks and must be finite, the EMA
    follows every step. Returns (the epoch's mean loss, the step after it)."""
    model.train()
    micro, losses = [], []
    for imgs, labels in batches:
        x = random_erasing(prepare(imgs), spec.random_erasing)
        micro.append(mix(x, torch.as_tensor(labels).to(device)))
        if len(micro) < spec.accum_steps:
            continue
        set_lr(optimizer, lr_at(step))
        loss = accumulate_step(model, optimizer, micro, device=device, bf16=spec.bf16)
        losses.append(float(all_reduce_mean(torch.tensor([loss], device=device))[0]))
        micro = []
        if not math.isfinite(losses[-1]):
            raise NonFiniteLossError(f"finetuning loss is {losses[-1]} at step {step}; lower finetune.lr")
        if ema is not None:
            update_ema(ema, unwrap(model), spec.ema_decay)
        step += 1
        if progress is not None:
            progress(losses[-1])
    return sum(losses) / max(len(losses), 1), step


def train_classifier(
    model: Classifier,
    spec: FinetuneSpec,
    *,
    steps_per_epoch: int,
    train_batches,
    eval_batches,
    prepare,
    device: torch.device,
    best_path: str | Path,
    class_names: Sequence[str],
    preprocess: Preprocess,
    world_size: int = 1,
    is_main: bool = True,
    on_epoch=None,
    progress=None,
    state=None,
    should_stop=None,
) -> dict | None:
    """Finetune, evaluate on val after every epoch and keep the best checkpoint by val top-1.

    Distributed: ``model`` wrapped by ``ijepa.distributed.ddp``, each rank's ``train_batches`` its share of
    every global batch and ``eval_batches`` its share of the split; losses and accuracies are averaged over
    ranks (every rank takes the same decisions) and only ``is_main`` writes ``best_path``.

    Args:
        model: ``Classifier`` on ``device`` (built with ``with_drop_path`` for stochastic depth), or DDP of it.
        spec: the recipe.
        steps_per_epoch: optimizer steps per epoch (each of ``accum_steps`` micro-batches).
        train_batches: ``epoch -> iterable of (uint8 images, labels)`` micro-batches.
        eval_batches: ``split -> iterable of (images, labels, keys)``.
        prepare: loader images -> normalised model input on ``device``.
        best_path: where the best classifier is saved (atomically).
        on_epoch: callback(epoch, {"train_loss", "lr", "val_top1", ...}); progress: callback per step.
        state: where the run is saved after every epoch and resumed from (``load() -> dict | None``,
            ``save(dict)``; ``pipeline.resume.EpochState``): model, optimiser, EMA, step, best so far, history and
            the random generators, so a resumed run ends bit-identical to an uninterrupted one on the CPU
            (``best_path`` must survive with it).
        should_stop: asked after every epoch (once its state is saved), the same answer on every rank.
    Returns:
        {"best_epoch", "val_top1", "val_top5", "lr", "history"}, or None when ``should_stop`` stopped it.
    """
    eff_batch = spec.batch_size * spec.accum_steps * world_size
    lr = spec.blr * eff_batch / 256
    core = unwrap(model)
    optimizer = torch.optim.AdamW(
        param_groups_lrd(core, spec.weight_decay, spec.layer_decay), lr=lr, betas=(0.9, 0.999)
    )
    mix = MixTargets(core.head.out_features, spec.mixup, spec.cutmix, spec.label_smoothing)
    ema = ema_copy(core) if spec.model_ema else None
    total, warmup = spec.epochs * steps_per_epoch, int(spec.warmup_epochs * steps_per_epoch)

    def lr_at(step: int) -> float:
        return warmup_cosine(step, warmup=warmup, total=total, ref=lr, final=spec.min_lr)

    step, best, history = 0, {"val_top1": -1.0}, []
    loop = EpochLoop(spec.epochs, state, should_stop)
    if (saved := loop.saved) is not None:
        core.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        if ema is not None:
            ema.load_state_dict(saved["ema"])
        step, best, history = saved["step"], saved["best"], saved["history"]
    for epoch in loop:
        batches = train_batches(epoch)
        loss, step = finetune_epoch(model, optimizer, batches, spec, mix, ema, lr_at, step, prepare, device, progress)
        candidates = [("model", core), *([("ema", ema)] if ema is not None else [])]
        scores = {
            n: evaluate(net, eval_batches("val"), prepare=prepare, device=device, bf16=spec.bf16)
            for n, net in candidates
        }
        row = {"epoch": epoch + 1, "train_loss": loss, "lr": optimizer.param_groups[-1]["lr"]}
        history.append(row | {f"{n}_val_top1": s["top1"] for n, s in scores.items()})
        for name, net in candidates:
            if scores[name]["top1"] > best["val_top1"]:  # a strict gain: the model before its EMA on a tie
                best = {"val_top1": scores[name]["top1"], "val_top5": scores[name]["top5"], "best_epoch": epoch + 1}
                best["weights"] = name
                if is_main:
                    meta = {"epoch": epoch + 1, "weights": name, "val_top1": scores[name]["top1"]}
                    save_classifier(best_path, net, class_names, preprocess, **meta)
        if on_epoch is not None:
            on_epoch(epoch + 1, history[-1])
        snapshot = {"model": core.state_dict(), "optimizer": optimizer.state_dict(), "step": step, "best": best}
        loop.end(epoch, snapshot | {"history": history} | ({"ema": ema.state_dict()} if ema is not None else {}))
    if loop.stopped:
        return None
    return best | {"lr": lr, "history": history, "steps": step}
