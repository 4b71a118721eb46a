"""Checkpoints: official I-JEPA layout plus a metadata entry; atomic writes; strict, weights-only loads.

A file holds ``encoder``, ``predictor``, ``target_encoder`` (state dicts with upstream's ``module.``
prefix, so the official loader reads our files), ``opt``, ``scaler``, ``epoch``, ``loss``,
``batch_size``, ``world_size``, ``lr`` as upstream writes them, plus ``ijepa_meta``: format version,
architectures, image and patch size, step and the run's params. Released official files (no metadata)
are rebuilt from their tensor shapes.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .interop import heads_from_config, hf_to_ijepa, read_state_file, to_ijepa
from .models.pos_embed import square_grid
from .models.registry import list_models, preset
from .models.vit import VisionTransformer
from .torchfile import CheckpointError, atomic_save, clean_state_dict, read_checkpoint

__all__ = ["CheckpointError", "atomic_save", "clean_state_dict", "read_checkpoint"]  # re-exported: their old home

FORMAT_VERSION = 1
META_KEY = "ijepa_meta"
MODEL_KEYS = ("encoder", "predictor", "target_encoder")


def _prefixed(module: nn.Module) -> dict[str, torch.Tensor]:
    return {f"module.{k}": v for k, v in module.state_dict().items()}


def save_checkpoint(
    path: str | Path,
    *,
    encoder: nn.Module,
    predictor: nn.Module,
    target_encoder: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    step: int,
    epoch: int,
    loss: float | None = None,
    batch_size: int | None = None,
    world_size: int = 1,
    lr: float | None = None,
    params: Mapping | None = None,
    extra: Mapping[str, Any] | None = None,
) -> None:
    """Write a training checkpoint atomically in the official layout plus ``ijepa_meta``.

    Args:
        path: destination file (``*.pth.tar`` by convention).
        encoder, predictor, target_encoder: the three modules.
        optimizer: its state is stored under ``opt``.
        step: optimizer steps done; epoch: epochs done.
        loss, batch_size, world_size, lr: upstream's bookkeeping entries.
        params: the run's parameters (plain nested dict), kept in the metadata.
        extra: further plain entries (e.g. extra heads' state dicts), stored at the top level.
    """
    meta = {
        "format_version": FORMAT_VERSION,
        "encoder": encoder.arch(),
        "predictor": predictor.arch(),
        "step": int(step),
        "epoch": int(epoch),
        "params": dict(params or {}),
    }
    state = {
        "encoder": _prefixed(encoder),
        "predictor": _prefixed(predictor),
        "target_encoder": _prefixed(target_encoder),
        "opt": optimizer.state_dict() if optimizer is not None else None,
        "scaler": None,
        "epoch": int(epoch),
        "loss": loss,
        "batch_size": batch_size,
        "world_size": world_size,
        "lr": lr,
        META_KEY: meta,
    }
    state.update(extra or {})
    atomic_save(state, path)


_HEADS_BY_WIDTH = {preset(n)["embed_dim"]: preset(n)["num_heads"] for n in list_models()}
_BLOCK = re.compile(r"^(?:predictor_)?blocks\.(\d+)\.")


def _depth(state: Mapping[str, torch.Tensor]) -> int:
    idx = {int(m.group(1)) for k in state if (m := _BLOCK.match(k))}
    return max(idx) + 1 if idx else 0


def infer_encoder_arch(state: Mapping[str, torch.Tensor], num_heads: int | None = None) -> dict:
    """Rebuild an encoder's arguments from its (cleaned) tensors.

    The head count is not visible in the weights: it comes from the official preset of that width
    unless ``num_heads`` is given. A non-square token count needs metadata.
    """
    try:
        dim, in_chans, patch, _ = state["patch_embed.proj.weight"].shape
        n_tokens = state["pos_embed"].shape[1]
        hidden = state["blocks.0.mlp.fc1.weight"].shape[0]
    except KeyError as e:
        raise CheckpointError(f"not an encoder state dict: missing {e.args[0]!r}") from e
    heads = num_heads or _HEADS_BY_WIDTH.get(dim)
    if heads is None:
        raise CheckpointError(f"width {dim} matches no official preset; pass num_heads explicitly")
    rows, cols = square_grid(n_tokens)
    return {
        "embed_dim": dim,
        "depth": _depth(state),
        "num_heads": heads,
        "mlp_ratio": hidden / dim,
        "patch_size": patch,
        "img_size": [rows * patch, cols * patch],
        "in_chans": in_chans,
    }


def infer_predictor_arch(state: Mapping[str, torch.Tensor], num_heads: int) -> dict:
    """Rebuild a predictor's arguments from its tensors (heads default to the encoder's, as upstream)."""
    try:
        pdim, dim = state["predictor_embed.weight"].shape
        n_tokens = state["predictor_pos_embed"].shape[1]
        hidden = state["predictor_blocks.0.mlp.fc1.weight"].shape[0]
    except KeyError as e:
        raise CheckpointError(f"not a predictor state dict: missing {e.args[0]!r}") from e
    return {
        "grid_size": list(square_grid(n_tokens)),
        "embed_dim": dim,
        "predictor_embed_dim": pdim,
        "depth": _depth(state),
        "num_heads": num_heads,
        "mlp_ratio": hidden / pdim,
    }


def load_state_strict(module: nn.Module, state: Mapping[str, torch.Tensor], where: str) -> None:
    """``load_state_dict`` that reports every missing, unexpected or mis-shaped key, naming ``where``."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in state and state[k].shape != own[k].shape
    ]
    if missing or unexpected or shapes:
        parts = []
        for label, keys in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", shapes)):
            if keys:
                shown = ", ".join(keys[:10]) + (f" ... (+{len(keys) - 10} more)" if len(keys) > 10 else "")
                parts.append(f"{label}: {shown}")
        raise CheckpointError(f"{where} does not fit the model; " + "; ".join(parts))
    module.load_state_dict(state, strict=True)


def _section(ckpt: Mapping, which: str, path: Path) -> dict[str, torch.Tensor]:
    if which not in MODEL_KEYS:
        raise ValueError(f"which must be one of {MODEL_KEYS}, got {which!r}")
    if which in ckpt and isinstance(ckpt[which], Mapping):
        return clean_state_dict(ckpt[which])
    flat = clean_state_dict(ckpt)
    if which != "predictor" and "patch_embed.proj.weight" in flat:
        return flat  # a bare encoder state dict in our (= official, = timm) names
    if which != "predictor" and any("embeddings.patch_embeddings." in k for k in flat):
        return hf_to_ijepa(flat)  # a bare Hugging Face IJepaModel state dict
    present = [k for k in MODEL_KEYS if k in ckpt]
    raise CheckpointError(f"{path} has no {which!r} entry (it has {present or sorted(ckpt)[:8]})")


def encoder_from_state(state: Mapping[str, torch.Tensor], arch: Mapping, where: str) -> VisionTransformer:
    """Build a ``VisionTransformer`` from ``arch`` and load ``state`` strictly."""
    model = VisionTransformer(**arch)
    load_state_strict(model, state, where)
    return model


def load_encoder(path: str | Path, which: str = "target_encoder", *, num_heads: int | None = None) -> VisionTransformer:
    """Load an encoder from an official release, one of our checkpoints, or a bare encoder state dict in our
    (= timm's) or Hugging Face's layout (``ijepa.interop``), as a torch file, a ``.safetensors`` file or a
    ``save_pretrained`` folder.

    Args:
        path: the ``.pth.tar`` file, ``.safetensors`` file or folder.
        which: "target_encoder" (the paper's evaluation choice), "encoder" (context encoder); files holding one
            encoder ignore it.
        num_heads: only for files without metadata or config.json whose width matches no official preset.
    Returns:
        The encoder in eval mode, rebuilt from the file alone (metadata, or inferred from tensors).
    """
    path = Path(path)
    if path.is_dir() or path.suffix == ".safetensors":
        raw, config = read_state_file(path)
        state, layout = to_ijepa(raw)
        arch = infer_encoder_arch(state, num_heads or heads_from_config(config))
        return encoder_from_state(state, arch, f"{path} [{layout} layout]").eval()
    ckpt = read_checkpoint(path)
    state = _section(ckpt, which, path)
    meta = ckpt.get(META_KEY)
    arch = meta["encoder"] if isinstance(meta, Mapping) and "encoder" in meta else infer_encoder_arch(state, num_heads)
    return encoder_from_state(state, arch, f"{path} [{which}]").eval()


def load_checkpoint_meta(path: str | Path) -> dict:
    """The ``ijepa_meta`` entry of one of our checkpoints (empty dict for official files)."""
    meta = read_checkpoint(path).get(META_KEY)
    return dict(meta) if isinstance(meta, Mapping) else {}


def build_from_checkpoint(path: str | Path, *, num_heads: int | None = None) -> tuple[dict, dict, dict]:
    """Read a checkpoint and return (ckpt, encoder_arch, predictor_arch), inferred when there is no metadata."""
    path = Path(path)
    ckpt = read_checkpoint(path)
    meta = ckpt.get(META_KEY)
    if isinstance(meta, Mapping) and "encoder" in meta and "predictor" in meta:
        return ckpt, dict(meta["encoder"]), dict(meta["predictor"])
    enc = infer_encoder_arch(_section(ckpt, "encoder", path), num_heads)
    pred = infer_predictor_arch(_section(ckpt, "predictor", path), enc["num_heads"])
    return ckpt, enc, pred


def load_training_state(
    path: str | Path,
    *,
    encoder: nn.Module,
    predictor: nn.Module,
    target_encoder: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    extra: Mapping[str, nn.Module] | None = None,
) -> dict:
    """Restore all three modules (strict), any ``extra`` modules saved under their names (e.g. DMT-JEPA's
    heads) and the optimizer from ``path``.

    Returns:
        the checkpoint dict (for ``epoch``, ``ijepa_meta`` and extra entries).
    """
    path = Path(path)
    ckpt = read_checkpoint(path)
    for name, module in (("encoder", encoder), ("predictor", predictor), ("target_encoder", target_encoder)):
        load_state_strict(module, _section(ckpt, name, path), f"{path} [{name}]")
    for name, module in (extra or {}).items():
        if not isinstance(ckpt.get(name), Mapping):
            raise CheckpointError(f"{path} has no {name!r} entry, which this objective needs to resume")
        load_state_strict(module, ckpt[name], f"{path} [{name}]")
    if optimizer is not None:
        if not isinstance(ckpt.get("opt"), Mapping):
            raise CheckpointError(f"{path} has no optimizer state ('opt') to resume from")
        try:
            optimizer.load_state_dict(ckpt["opt"])
        except (ValueError, KeyError) as e:
            raise CheckpointError(f"{path} optimizer state does not fit: {e}") from e
    return ckpt
