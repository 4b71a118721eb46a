"""ViT encoder/predictor, presets and positional embeddings."""

from .pos_embed import resample_pos_embed, sincos_2d
from .registry import create_encoder, create_predictor, list_models, preset
from .vit import (
    Block,
    VisionTransformer,
    VisionTransformerPredictor,
    apply_masks,
    random_like,
    repeat_interleave_batch,
)

__all__ = [
    "Block",
    "VisionTransformer",
    "VisionTransformerPredictor",
    "apply_masks",
    "create_encoder",
    "create_predictor",
    "list_models",
    "preset",
    "random_like",
    "repeat_interleave_batch",
    "resample_pos_embed",
    "sincos_2d",
]
