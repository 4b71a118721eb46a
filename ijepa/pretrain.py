"""Pretraining from explicit arguments: build, resume, loop over epochs, checkpoint atomically."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .checkpoint import load_training_state, save_checkpoint
from .engine import Batch, StepLog, build_optimizer, train_epoch
from .jepa import JEPA
from .models.registry import create_encoder, create_predictor
from .schedules import make_schedules


@dataclass(frozen=True, kw_only=True)  # by keyword only: no silent swap of two numbers
class ModelSpec:
    """Encoder preset and geometry, and the predictor's size."""

    name: str = "vit_base"
    patch_size: int = 16
    img_size: int = 224
    in_chans: int = 3
    pred_depth: int = 6
    pred_emb_dim: int = 384
    overrides: Mapping = field(default_factory=dict)  # explicit preset changes (e.g. depth for a demo)
    objective: Mapping = field(default_factory=lambda: {"name": "ijepa"})  # or dmt_jepa with window, k, depth


@dataclass(frozen=True, kw_only=True)  # by keyword only: no silent swap of two numbers
class OptimSpec:
    """Upstream's optimisation section."""

    epochs: int = 300
    warmup: float = 40
    start_lr: float = 2e-4
    lr: float = 1e-3
    final_lr: float = 1e-6
    weight_decay: float = 0.04
    final_weight_decay: float = 0.4
    ema: tuple[float, float] = (0.996, 1.0)
    ipe_scale: float = 1.0
    bf16: bool = True


def build_jepa(model: ModelSpec, seed: int) -> JEPA:
    """Encoder, predictor and target built deterministically from ``seed``."""
    torch.manual_seed(seed)
    enc = create_encoder(
        model.name,
        patch_size=model.patch_size,
        img_size=model.img_size,
        in_chans=model.in_chans,
        **dict(model.overrides),
    )
    pred = create_predictor(
        model.name,
        patch_size=model.patch_size,
        img_size=model.img_size,
        predictor_embed_dim=model.pred_emb_dim,
        depth=model.pred_depth,
        embed_dim=enc.embed_dim,
        num_heads=enc.num_heads,
    )
    objective = dict(model.objective)
    name = objective.pop("name")
    if name == "ijepa":
        return JEPA(enc, pred)
    if name == "dmt_jepa":
        from .dmt import DMTJEPA

        return DMTJEPA(enc, pred, **objective)
    raise ValueError(f"unknown objective {name!r}; valid: ijepa, dmt_jepa")


def pretrain(
    *,
    model: ModelSpec,
    optim: OptimSpec,
    ipe: int,
    batch_size: int,
    make_batches: Callable[[int, int], Iterable[Batch]],
    out_dir: str | Path,
    device: torch.device,
    seed: int = 0,
    resume: bool = True,
    save_every_epochs: int = 0,
    world_size: int = 1,
    is_main: bool = True,
    reduce_loss: Callable[[torch.Tensor], torch.Tensor] | None = None,
    wrap: Callable[[JEPA], torch.nn.Module] | None = None,
    on_step: Callable[[StepLog], None] | None = None,
    on_epoch: Callable[[int, float], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    monitor: Callable[[torch.nn.Module, int], None] | None = None,
    monitor_every: int = 0,
    params: Mapping | None = None,
) -> dict:
    """Train I-JEPA for ``optim.epochs * ipe`` steps, resuming from ``out_dir/jepa-latest.pth.tar``.

    Args:
        model, optim: architecture and optimisation.
        ipe: optimizer steps per epoch.
        batch_size: per-rank batch (recorded in checkpoints).
        make_batches: ``(epoch, start_step) -> iterable`` of batches for steps ``start_step ..`` of that
            epoch (``start_step`` may fall inside the epoch after a preemption); must yield exactly what an
            uninterrupted run would have from that step on, for exact resume.
        out_dir: checkpoint folder.
        device: from ``ijepa.device.pick_device``.
        seed: model initialisation seed.
        resume: continue from the latest checkpoint when one exists.
        save_every_epochs: also keep ``jepa-ep{N}.pth.tar`` every N epochs (N = epochs done; 0 = never).
        world_size, is_main: distributed context; only the main rank writes files.
        reduce_loss: all-reduce for the logged loss; wrap: e.g. DDP around the module.
        on_step, on_epoch: callbacks (step logs; (epoch done, mean loss)).
        should_stop: asked after every step (same answer on every rank); True saves a checkpoint at that
            step, mid-epoch if need be, and returns with ``stopped`` set (SLURM preemption / time limit).
        monitor: ``(target encoder, steps done)``, called before the first step of a fresh run, after every
            ``monitor_every`` steps (0: never) and at each epoch end (e.g. ``ijepa.monitor.HealthMonitor``
            feeding a log); it must not draw random numbers. Every rank calls it (the target encoders are
            identical), so an exception it raises stops all ranks alike.
        params: stored in checkpoint metadata.
    Returns:
        {"step", "epoch", "loss", "checkpoint", "stopped"}.
    """
    out_dir = Path(out_dir)
    latest = out_dir / "jepa-latest.pth.tar"
    jepa = build_jepa(model, seed).to(device)
    optimizer = build_optimizer(jepa)
    schedules = make_schedules(
        ipe=ipe,
        epochs=optim.epochs,
        warmup_epochs=optim.warmup,
        start_lr=optim.start_lr,
        lr=optim.lr,
        final_lr=optim.final_lr,
        weight_decay=optim.weight_decay,
        final_weight_decay=optim.final_weight_decay,
        ema=tuple(optim.ema),
        ipe_scale=optim.ipe_scale,
    )
    step, loss = 0, float("nan")
    if resume and latest.exists():
        ckpt = load_training_state(
            latest,
            encoder=jepa.encoder,
            predictor=jepa.predictor,
            target_encoder=jepa.target_encoder,
            optimizer=optimizer,
            extra={m: getattr(jepa, m) for m in jepa.extra_modules},
        )
        step, loss = int(ckpt["ijepa_meta"]["step"]), ckpt.get("loss") or float("nan")
        if ckpt["ijepa_meta"].get("params", {}).get("ipe", ipe) != ipe:
            raise RuntimeError(
                f"{latest} was written with {ckpt['ijepa_meta']['params']['ipe']} steps per epoch, this run has "
                f"{ipe} (batch size or world size changed): its schedules and data order cannot be continued"
            )
    runner = wrap(jepa) if wrap is not None else jepa
    meta_params = {"model": asdict(model), "optim": asdict(optim), "ipe": ipe, **dict(params or {})}
    stopped = False

    def after_step(log: StepLog) -> None:
        if on_step is not None:
            on_step(log)
        done = log.step + 1
        if monitor is not None and (done % ipe == 0 or (monitor_every and done % monitor_every == 0)):
            monitor(jepa.target_encoder, done)

    if monitor is not None and step == 0:
        monitor(jepa.target_encoder, 0)
    for epoch in range(step // ipe, optim.epochs):
        step, loss = train_epoch(
            runner,
            optimizer,
            schedules,
            make_batches(epoch, step),
            epoch=epoch,
            start_step=step,
            end_step=(epoch + 1) * ipe,
            device=device,
            bf16=optim.bf16,
            reduce_loss=reduce_loss,
            on_step=after_step,
            should_stop=should_stop,
        )
        stopped = step < (epoch + 1) * ipe
        if is_main:
            kwargs = dict(
                encoder=jepa.encoder,
                predictor=jepa.predictor,
                target_encoder=jepa.target_encoder,
                optimizer=optimizer,
                step=step,
                epoch=step // ipe,  # epochs completed (a preempted run's checkpoint may sit mid-epoch)
                loss=loss,
                batch_size=batch_size,
                world_size=world_size,
                lr=optim.lr,
                params=meta_params,
                extra={m: getattr(jepa, m).state_dict() for m in jepa.extra_modules},
            )
            save_checkpoint(latest, **kwargs)
            if not stopped and save_every_epochs and (epoch + 1) % save_every_epochs == 0:
                save_checkpoint(out_dir / f"jepa-ep{epoch + 1}.pth.tar", **kwargs)
        if stopped:
            break
        if on_epoch is not None:
            on_epoch(epoch + 1, loss)
    return {"step": step, "epoch": step // ipe, "loss": loss, "checkpoint": str(latest), "stopped": stopped}
