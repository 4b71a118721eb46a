"""Encoder weights in the ecosystem's layouts: timm and Hugging Face transformers, read and written.

- **timm** (``vit_huge_patch14_gap_224`` and the other ``*_gap_*`` I-JEPA models: no class token, average
  pooling, no ``fc_norm``) uses the official I-JEPA names (``patch_embed.proj``, ``pos_embed``,
  ``blocks.N.attn.qkv``, ``norm``), which are ours: the mapping is the identity, checked strictly.
- **Hugging Face** ``IJepaModel``: ``embeddings.patch_embeddings.projection``, ``embeddings.position_embeddings``,
  per layer ``layernorm_before/after``, separate query/key/value and ``layernorm``. Both the names of the files
  on the Hub (transformers 4: ``encoder.layer.N.attention.attention.query``, ``intermediate.dense``,
  ``output.dense``) and transformers 5's module names (``layers.N.attention.q_proj``, ``mlp.fc1``) are read;
  exports use the Hub's names, which both major versions load.

Note: the Hub's converted I-JEPA weights (and timm's loader of the official files) took the official file's
context ``encoder``, not the ``target_encoder`` the paper evaluates. A bare state dict does not say which of
the two it holds; load the official ``.pth.tar`` with ``which="target_encoder"`` to get the paper's encoder.

Files: a ``.safetensors`` file, a torch file (read weights-only), or a folder holding ``model.safetensors``
(or ``pytorch_model.bin``) and the ``config.json`` that ``save_pretrained`` or timm's hub export writes.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path

import torch

from .models.vit import VisionTransformer
from .torchfile import CheckpointError, clean_state_dict, read_checkpoint

LAYOUTS = ("ijepa", "timm", "hf")
_HF_PREFIXES = ("ijepa.", "model.")
_HF_LAYER = re.compile(r"^(?:encoder\.layer|layers)\.(\d+)\.(.+)$")
# per-layer HF names (transformers 4 Hub names and transformers 5 module names) -> ours
_HF_PARTS = {
    "layernorm_before": "norm1",
    "layernorm_after": "norm2",
    "attention.output.dense": "attn.proj",
    "attention.o_proj": "attn.proj",
    "intermediate.dense": "mlp.fc1",
    "mlp.fc1": "mlp.fc1",
    "output.dense": "mlp.fc2",
    "mlp.fc2": "mlp.fc2",
}
_HF_QKV = {
    "attention.attention.query": "q",
    "attention.attention.key": "k",
    "attention.attention.value": "v",
    "attention.q_proj": "q",
    "attention.k_proj": "k",
    "attention.v_proj": "v",
}
_HF_TOP = {
    "embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
    "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
    "embeddings.position_embeddings": "pos_embed",
    "layernorm.weight": "norm.weight",
    "layernorm.bias": "norm.bias",
}


def read_state_file(path: str | Path) -> tuple[dict[str, torch.Tensor], dict | None]:
    """(state dict, config.json or None) of a safetensors file, a torch file or a ``save_pretrained`` folder."""
    path = Path(path)
    config = None
    if path.is_dir():
        cfg = path / "config.json"
        if cfg.is_file():
            try:
                config = json.loads(cfg.read_text())
            except json.JSONDecodeError as e:
                raise CheckpointError(f"{cfg} is not valid JSON: {e}") from None
        found = [path / n for n in ("model.safetensors", "pytorch_model.bin", "open_clip_model.safetensors")]
        found = [p for p in found if p.is_file()]
        if not found:
            raise CheckpointError(f"{path} holds no model.safetensors or pytorch_model.bin")
        path = found[0]
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        if not path.is_file():
            raise CheckpointError(f"checkpoint {path} does not exist")
        try:
            return load_file(path), config
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{path} is not a readable safetensors file ({e})") from None
    return read_checkpoint(path), config


def detect_layout(state: Mapping[str, torch.Tensor]) -> str:
    """ "ijepa" (ours, the official code's and timm's names) or "hf"; an error for anything else."""
    keys = set(state)
    if "patch_embed.proj.weight" in keys:
        return "ijepa"
    if any(k.removeprefix(p).startswith("embeddings.patch_embeddings.") for k in keys for p in ("", *_HF_PREFIXES)):
        return "hf"
    raise CheckpointError(f"not an encoder state dict in a known layout (keys: {sorted(keys)[:6]})")


def hf_to_ijepa(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Hugging Face ``IJepaModel`` names -> ours, every key accounted for (unexpected ones are named)."""
    out, qkv, unexpected = {}, {}, []
    for key, value in state.items():
        name = key
        for p in _HF_PREFIXES:
            name = name.removeprefix(p)
        if name in _HF_TOP:
            out[_HF_TOP[name]] = value
            continue
        m = _HF_LAYER.match(name)
        if m is None:
            unexpected.append(key)
            continue
        layer, rest = int(m.group(1)), m.group(2)
        part, _, kind = rest.rpartition(".")
        if part in _HF_PARTS and kind in ("weight", "bias"):
            out[f"blocks.{layer}.{_HF_PARTS[part]}.{kind}"] = value
        elif part in _HF_QKV and kind in ("weight", "bias"):
            qkv.setdefault((layer, kind), {})[_HF_QKV[part]] = value
        else:
            unexpected.append(key)
    if unexpected:
        shown = ", ".join(sorted(unexpected)[:8]) + (" ..." if len(unexpected) > 8 else "")
        raise CheckpointError(f"Hugging Face state dict has keys an I-JEPA encoder does not have: {shown}")
    for (layer, kind), parts in sorted(qkv.items()):
        if set(parts) != {"q", "k", "v"}:
            missing = sorted({"q", "k", "v"} - set(parts))
            raise CheckpointError(f"Hugging Face layer {layer} lacks the {'/'.join(missing)} {kind} of its attention")
        out[f"blocks.{layer}.attn.qkv.{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    return out


def ijepa_to_hf(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Ours -> the Hub's ``IJepaModel`` names (transformers 4 names, which transformers 5 also loads)."""
    top = {v: k for k, v in _HF_TOP.items()}
    part_names = {
        "norm1": "layernorm_before",
        "norm2": "layernorm_after",
        "attn.proj": "attention.output.dense",
        "mlp.fc1": "intermediate.dense",
        "mlp.fc2": "output.dense",
    }
    out = {}
    for key, value in state.items():
        if key in top:
            out[top[key]] = value
            continue
        m = re.match(r"^blocks\.(\d+)\.(.+)\.(weight|bias)$", key)
        if m is None:
            raise CheckpointError(f"{key} has no Hugging Face counterpart")
        layer, part, kind = m.groups()
        prefix = f"encoder.layer.{layer}."
        if part == "attn.qkv":
            for name, chunk in zip(("query", "key", "value"), value.chunk(3, dim=0), strict=True):
                out[f"{prefix}attention.attention.{name}.{kind}"] = chunk.clone()
        elif part in part_names:
            out[f"{prefix}{part_names[part]}.{kind}"] = value
        else:
            raise CheckpointError(f"{key} has no Hugging Face counterpart")
    return out


def to_ijepa(state: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], str]:
    """Any supported layout -> (our names, the layout detected)."""
    state = clean_state_dict(state)
    layout = detect_layout(state)
    return (hf_to_ijepa(state) if layout == "hf" else dict(state)), layout


def heads_from_config(config: Mapping | None) -> int | None:
    """The head count a ``config.json`` gives (transformers' ``num_attention_heads``, timm's ``num_heads``)."""
    if not config:
        return None
    for key in ("num_attention_heads", "num_heads"):
        if isinstance(config.get(key), int):
            return config[key]
    args = config.get("model_args")
    return args.get("num_heads") if isinstance(args, Mapping) else None


def hf_config(arch: Mapping) -> dict:
    """``config.json`` of an ``IJepaModel`` with this encoder's architecture (LayerNorm eps 1e-6, as upstream)."""
    dim = arch["embed_dim"]
    img = arch["img_size"]
    return {
        "architectures": ["IJepaModel"],
        "model_type": "ijepa",
        "hidden_size": dim,
        "num_hidden_layers": arch["depth"],
        "num_attention_heads": arch["num_heads"],
        "intermediate_size": round(dim * arch["mlp_ratio"]),
        "hidden_act": "gelu",
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
        "layer_norm_eps": 1e-6,
        "image_size": img[0] if img[0] == img[1] else list(img),
        "patch_size": arch["patch_size"],
        "num_channels": arch.get("in_chans", 3),
        "qkv_bias": True,
    }


def timm_config(arch: Mapping) -> dict:
    """timm's hub ``config.json``: the gap ViT (no class token, average pooling, no fc_norm) with these args."""
    img = arch["img_size"]
    return {
        "architecture": "vit_base_patch16_224",
        "num_classes": 0,
        "global_pool": "avg",
        "model_args": {
            "img_size": img[0] if img[0] == img[1] else list(img),
            "patch_size": arch["patch_size"],
            "embed_dim": arch["embed_dim"],
            "depth": arch["depth"],
            "num_heads": arch["num_heads"],
            "mlp_ratio": arch["mlp_ratio"],
            "class_token": False,
            "global_pool": "avg",
            "fc_norm": False,
            "num_classes": 0,
        },
        "pretrained_cfg": {
            "input_size": [arch.get("in_chans", 3), img[0], img[1]],
            "mean": [0.485, 0.456, 0.406],
            "std": [0.229, 0.224, 0.225],
            "num_classes": 0,
        },
    }


def export_encoder(encoder: VisionTransformer, out_dir: str | Path, to: str) -> Path:
    """Write ``encoder`` as ``out_dir/model.safetensors`` + ``out_dir/config.json`` in timm's or Hugging Face's
    layout: ``timm.models.VisionTransformer(**config["model_args"])`` loads the first strictly,
    ``transformers.IJepaModel.from_pretrained(out_dir)`` the second."""
    from safetensors.torch import save_file

    if to not in ("timm", "hf"):
        raise ValueError(f"export layout must be 'timm' or 'hf', got {to!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in encoder.state_dict().items()}
    arch = encoder.arch()
    if to == "hf":
        state, config = ijepa_to_hf(state), hf_config(arch)
    else:
        config = timm_config(arch)
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt", "exported_by": "ijepa"})
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out
