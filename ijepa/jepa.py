"""The I-JEPA training module: context encoder, predictor and EMA target encoder in one place."""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .models.vit import VisionTransformer, VisionTransformerPredictor, apply_masks, repeat_interleave_batch


class JEPA(nn.Module):
    """Owns ``encoder`` (context), ``predictor`` and ``target_encoder`` (EMA copy, no gradients).

    Args:
        encoder: the context encoder.
        predictor: the predictor matching it.
        target_encoder: an existing target (e.g. loaded); default a deep copy of ``encoder``.
    """

    extra_modules: tuple[str, ...] = ()  # further trained/EMA modules saved in checkpoints (DMT-JEPA's heads)

    def __init__(
        self,
        encoder: VisionTransformer,
        predictor: VisionTransformerPredictor,
        target_encoder: VisionTransformer | None = None,
    ):
        super().__init__()
        self.encoder = encoder
        self.predictor = predictor
        self.target_encoder = target_encoder if target_encoder is not None else copy.deepcopy(encoder)
        self.target_encoder.requires_grad_(False)

    @torch.no_grad()
    def targets(self, imgs: torch.Tensor, masks_pred: Sequence[torch.Tensor], nenc: int) -> torch.Tensor:
        """Layer-normed target features at the target blocks: (npred * nenc * B, K_pred, D)."""
        h = self.target_encoder(imgs)
        h = F.layer_norm(h, (h.size(-1),))  # no affine, as upstream
        h = apply_masks(h, masks_pred)
        return repeat_interleave_batch(h, imgs.size(0), repeat=nenc)

    def context(self, imgs: torch.Tensor, masks_enc: Sequence[torch.Tensor]) -> torch.Tensor:
        """Context tokens fed to the predictor: (nenc * B, K_enc, D)."""
        return self.encoder(imgs, masks_enc)

    def forward(
        self, imgs: torch.Tensor, masks_enc: Sequence[torch.Tensor], masks_pred: Sequence[torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """One I-JEPA loss.

        Args:
            imgs: (B, C, H, W).
            masks_enc: nenc LongTensors (B, K_enc).
            masks_pred: npred LongTensors (B, K_pred).
        Returns:
            {"loss": scalar smooth-L1 (beta 1, mean over all elements), "pred": predictions, "target": targets}.
        """
        h = self.targets(imgs, masks_pred, len(masks_enc))
        z = self.predictor(self.context(imgs, masks_enc), masks_enc, masks_pred)
        # Upstream's loss is smooth-L1 on layer-normed targets (the paper writes L2); we follow the code.
        loss = F.smooth_l1_loss(z.float(), h.float())
        return {"loss": loss, "pred": z, "target": h}

    @torch.no_grad()
    def update_target(self, momentum: float) -> None:
        """EMA: target <- m * target + (1 - m) * encoder, over all parameters (frozen ones included)."""
        tgt = list(self.target_encoder.parameters())
        src = [p.detach() for p in self.encoder.parameters()]
        torch._foreach_mul_(tgt, momentum)
        torch._foreach_add_(tgt, src, alpha=1.0 - momentum)

    def param_groups(self) -> list[dict]:
        """Upstream's four AdamW groups, in its order (so optimizer states line up with official files).

        0: encoder weights, 1: predictor weights (decayed); 2: encoder biases and 1-D params,
        3: predictor biases and 1-D params (``WD_exclude``, upstream's key; weight decay 0).
        """

        def split(module: nn.Module, decay: bool) -> list[nn.Parameter]:
            return [p for n, p in module.named_parameters() if ("bias" not in n and p.ndim != 1) == decay]

        return [
            {"params": split(self.encoder, True), "WD_exclude": False},
            {"params": split(self.predictor, True), "WD_exclude": False},
            {"params": split(self.encoder, False), "WD_exclude": True, "weight_decay": 0.0},
            {"params": split(self.predictor, False), "WD_exclude": True, "weight_decay": 0.0},
        ]
