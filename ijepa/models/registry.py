"""Named size presets and the two builders, ``create_encoder`` and ``create_predictor``.

The presets are the official ones (``src/models/vision_transformer.py``): all use qkv bias and
LayerNorm(eps=1e-6); only vit_giant has a non-4 MLP ratio (48/11, hidden 6144 at D=1408).
"""

from __future__ import annotations

from collections.abc import Callable

from .vit import Size2, VisionTransformer, VisionTransformerPredictor, to_2tuple

_PRESETS: dict[str, Callable[[], dict]] = {}


def register_preset(fn: Callable[[], dict]) -> Callable[[], dict]:
    """Register a preset function (its name is the preset name) returning architecture kwargs."""
    if fn.__name__ in _PRESETS:
        raise ValueError(f"preset {fn.__name__!r} registered twice")
    _PRESETS[fn.__name__] = fn
    return fn


@register_preset
def vit_tiny() -> dict:
    return dict(embed_dim=192, depth=12, num_heads=3, mlp_ratio=4.0)


@register_preset
def vit_small() -> dict:
    return dict(embed_dim=384, depth=12, num_heads=6, mlp_ratio=4.0)


@register_preset
def vit_base() -> dict:
    return dict(embed_dim=768, depth=12, num_heads=12, mlp_ratio=4.0)


@register_preset
def vit_large() -> dict:
    return dict(embed_dim=1024, depth=24, num_heads=16, mlp_ratio=4.0)


@register_preset
def vit_huge() -> dict:
    return dict(embed_dim=1280, depth=32, num_heads=16, mlp_ratio=4.0)


@register_preset
def vit_giant() -> dict:
    return dict(embed_dim=1408, depth=40, num_heads=16, mlp_ratio=48 / 11)


def list_models() -> list[str]:
    """Names of all registered encoder presets, sorted by width."""
    return sorted(_PRESETS, key=lambda n: _PRESETS[n]()["embed_dim"])


def preset(name: str) -> dict:
    """Architecture kwargs of a preset; an unknown name lists the valid ones."""
    if name not in _PRESETS:
        raise ValueError(f"unknown model {name!r}; valid names: {', '.join(list_models())}")
    return _PRESETS[name]()


def create_encoder(
    name: str,
    *,
    patch_size: int = 16,
    img_size: Size2 = 224,
    in_chans: int = 3,
    drop_path_rate: float = 0.0,
    **overrides,
) -> VisionTransformer:
    """Build an encoder from a preset name.

    Args:
        name: one of ``list_models()``.
        patch_size: patch side.
        img_size: construction resolution (int or (H, W)).
        in_chans: input channels.
        drop_path_rate: stochastic depth (finetuning).
        overrides: explicit architecture changes (e.g. ``depth=6`` for a debug model).
    Returns:
        VisionTransformer in train mode.
    """
    kwargs = preset(name) | overrides
    return VisionTransformer(
        img_size=img_size, patch_size=patch_size, in_chans=in_chans, drop_path_rate=drop_path_rate, **kwargs
    )


def create_predictor(
    name: str,
    *,
    patch_size: int = 16,
    img_size: Size2 = 224,
    predictor_embed_dim: int = 384,
    depth: int = 6,
    num_heads: int | None = None,
    embed_dim: int | None = None,
) -> VisionTransformerPredictor:
    """Build the predictor that matches an encoder preset.

    Args:
        name: the encoder preset (gives D and, as upstream, the head count).
        patch_size, img_size: the encoder's input geometry (gives the token grid).
        predictor_embed_dim: predictor width (official: 384).
        depth: predictor depth (official: 6 for ViT-B, 12 for ViT-L/H, 16 for ViT-g).
        num_heads: heads; default the encoder's, as ``helper.init_model`` does.
        embed_dim: encoder width override (when the encoder was built with overrides).
    Returns:
        VisionTransformerPredictor in train mode.
    """
    p = preset(name)
    h, w = to_2tuple(img_size)
    if h % patch_size or w % patch_size:
        raise ValueError(f"image size {h}x{w} is not divisible by patch size {patch_size}")
    return VisionTransformerPredictor(
        grid_size=(h // patch_size, w // patch_size),
        embed_dim=embed_dim or p["embed_dim"],
        predictor_embed_dim=predictor_embed_dim,
        depth=depth,
        num_heads=num_heads or p["num_heads"],
    )
