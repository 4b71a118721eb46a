"""Dense heads on an I-JEPA encoder: tokens reshaped to the known patch grid, logits at input resolution; the
self-contained segmenter file (weights, architecture, classes, input size)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..checkpoint import CheckpointError, atomic_save, load_state_strict, read_checkpoint
from ..data.transforms import IMAGENET_MEAN, IMAGENET_STD
from ..models.vit import VisionTransformer
from .data import SegClasses

SEGMENTER_FORMAT = "ijepa-segmenter"

HEADS = ("linear", "decoder")


class LinearHead(nn.Module):
    """BatchNorm + 1x1 conv over the (concatenated) layer features: the dinov2 "linear" / "ms" BNHead."""

    def __init__(self, in_dim: int, num_classes: int):
        super().__init__()
        self.bn = nn.BatchNorm2d(in_dim)
        self.conv = nn.Conv2d(in_dim, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(self.bn(x))


class ProgressiveDecoder(nn.Module):
    """A light decoder: 1x1 projection, then ``steps`` x (2x bilinear upsampling, 3x3 conv, BN, ReLU), 1x1 out."""

    def __init__(self, in_dim: int, num_classes: int, width: int = 128, steps: int = 2):
        super().__init__()
        self.proj = nn.Sequential(nn.Conv2d(in_dim, width, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(True))
        self.ups = nn.ModuleList(
            nn.Sequential(
                nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True)
            )
            for _ in range(steps)
        )
        self.out = nn.Conv2d(width, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.proj(x)
        for block in self.ups:
            x = block(F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False))
        return self.out(x)


class SegmentationModel(nn.Module):
    """Encoder + head. ``forward`` maps (B, 3, H, W) to logits (B, K, H, W) for any H, W divisible by the patch.

    Args:
        encoder: an I-JEPA ``VisionTransformer`` (positional embeddings are resampled to the input grid).
        num_classes: K.
        head: "linear" (BN + 1x1 conv) or "decoder" (progressive upsampling).
        layers: how many of the last blocks to concatenate (1 = last layer only).
        freeze_encoder: frozen (default, the paper-style probe) or finetuned with the head.
        decoder_width: channels of the decoder head.
    """

    def __init__(
        self,
        encoder: VisionTransformer,
        num_classes: int,
        *,
        head: str = "linear",
        layers: int = 1,
        freeze_encoder: bool = True,
        decoder_width: int = 128,
    ):
        super().__init__()
        if head not in HEADS:
            raise ValueError(f"head must be one of {HEADS}, got {head!r}")
        if not 1 <= layers <= encoder.depth:
            raise ValueError(f"layers must be in 1..{encoder.depth} for this encoder, got {layers}")
        self.encoder, self.layers, self.freeze_encoder = encoder, layers, freeze_encoder
        self.head_kind, self.num_classes, self.decoder_width = head, num_classes, decoder_width
        in_dim = encoder.embed_dim * layers
        self.head = (
            LinearHead(in_dim, num_classes)
            if head == "linear"
            else ProgressiveDecoder(in_dim, num_classes, decoder_width)
        )
        if freeze_encoder:
            self.encoder.requires_grad_(False)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.freeze_encoder:
            self.encoder.eval()  # a frozen encoder never runs in training mode (drop path etc.)
        return self

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, layers * D, h, w) from the known token grid (h, w) = (H / p, W / p), never sqrt(N)."""
        h, w = self.encoder.grid_for(x.shape[-2], x.shape[-1])
        if self.freeze_encoder and torch.is_grad_enabled():
            with torch.no_grad():
                outs = self.encoder.get_intermediate_layers(x, self.layers)
        else:  # no grad-mode switch where none is needed: torch.export records one as a node that its loader refuses
            outs = self.encoder.get_intermediate_layers(x, self.layers)
        tokens = torch.cat(outs, dim=-1)
        return tokens.transpose(1, 2).reshape(x.shape[0], -1, h, w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.head(self.features(x))
        return F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)

    def config(self) -> dict:
        return {
            "encoder_arch": self.encoder.arch(),
            "num_classes": self.num_classes,
            "head": self.head_kind,
            "layers": self.layers,
            "freeze_encoder": self.freeze_encoder,
            "decoder_width": self.decoder_width,
        }

    def trainable_parameters(self) -> Sequence[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]


@dataclass(frozen=True)
class SegPreprocess:
    """Model input size (H, W) and normalisation, stored with the segmenter."""

    height: int
    width: int
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD


def save_segmenter(path: str | Path, model: SegmentationModel, classes: SegClasses, pre: SegPreprocess, **info) -> None:
    """Atomic save of everything ``ijepa segment`` needs: weights, architecture, classes and colours, input size."""
    atomic_save(
        {
            "format": SEGMENTER_FORMAT,
            "format_version": 1,
            "model": model.state_dict(),
            "config": model.config(),
            "classes": classes.to_dict(),
            "preprocess": {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(pre).items()},
            "info": info,
        },
        path,
    )


def load_segmenter(path: str | Path) -> tuple[SegmentationModel, SegClasses, SegPreprocess]:
    """Rebuild a segmenter from its file alone (model in eval mode)."""
    ckpt = read_checkpoint(path)
    if ckpt.get("format") != SEGMENTER_FORMAT:
        raise CheckpointError(
            f"{path} is not a segmenter (format {ckpt.get('format')!r}); train one with the seg_train stage"
        )
    cfg = ckpt["config"]
    model = SegmentationModel(
        VisionTransformer(**cfg["encoder_arch"]),
        cfg["num_classes"],
        head=cfg["head"],
        layers=cfg["layers"],
        freeze_encoder=cfg["freeze_encoder"],
        decoder_width=cfg["decoder_width"],
    )
    load_state_strict(model, ckpt["model"], f"{path} [model]")
    pp = ckpt["preprocess"]
    pre = SegPreprocess(pp["height"], pp["width"], tuple(pp["mean"]), tuple(pp["std"]))
    return model.eval(), SegClasses.from_dict(ckpt["classes"], f"{path} [classes]"), pre
