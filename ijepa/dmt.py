"""DMT-JEPA (arXiv 2405.17995): discriminative masked targets as a second pretraining objective.

Targets: for every patch, the ``k`` most similar patches (cosine, on the layer-normed target features)
inside a ``window x window`` neighbourhood, the patch itself excluded, are aggregated by class-attention
blocks whose query is the image's mean token; the result is that patch's target. Context: the same head in
context mode adds a learned summary of the context tokens to every context token before the (unchanged)
I-JEPA predictor. The target head is the EMA of the context head, with the encoder's momentum.

Fixes to the released code (which cannot even be imported): no wrap-around at the image border (window
positions outside the grid are never candidates), each patch's query is its own image's mean token
(upstream pairs patch (b, n) with image (b * N + n) mod B), and both heads are saved in checkpoints and
restored on resume.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .jepa import JEPA
from .models.vit import (
    MLP,
    VisionTransformer,
    VisionTransformerPredictor,
    apply_masks,
    attention,
    repeat_interleave_batch,
)


def window_candidates(grid: tuple[int, int], window: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Neighbour candidates of every patch: (N, window^2 - 1) indices and a validity mask (False outside
    the grid; those slots hold the patch's own index as a placeholder). Row-major tokens."""
    if window < 3 or window % 2 == 0:
        raise ValueError(f"window must be an odd number >= 3, got {window}")
    h, w = grid
    r = window // 2
    offsets = [(dy, dx) for dy in range(-r, r + 1) for dx in range(-r, r + 1) if (dy, dx) != (0, 0)]
    rows = torch.arange(h).repeat_interleave(w)
    cols = torch.arange(w).repeat(h)
    dy = torch.tensor([o[0] for o in offsets])
    dx = torch.tensor([o[1] for o in offsets])
    nr, nc = rows[:, None] + dy, cols[:, None] + dx
    valid = (nr >= 0) & (nr < h) & (nc >= 0) & (nc < w)
    idx = torch.where(valid, nr * w + nc, (rows * w + cols)[:, None])
    return idx, valid


def select_neighbours(feats: torch.Tensor, cand: torch.Tensor, valid: torch.Tensor, k: int):
    """The k most cosine-similar valid candidates of every patch.

    Args:
        feats: (B, N, D); cand, valid: (N, C) from ``window_candidates``.
    Returns:
        (indices (B, N, k), valid (B, N, k)): a border patch with fewer than k valid candidates gets
        invalid slots, which the aggregation masks out.
    """
    x = F.normalize(feats.float(), dim=-1)
    sims = torch.einsum("bnd,bncd->bnc", x, x[:, cand])
    sims = sims.masked_fill(~valid, float("-inf"))
    top, pos = sims.topk(min(k, cand.shape[1]), dim=-1)
    return torch.gather(cand.expand(feats.shape[0], -1, -1), 2, pos), torch.isfinite(top)


class ClassAttention(nn.Module):
    """Attention whose only query is the first token (CaiT class attention)."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x (M, L, D), key_mask (M, L) True = attend -> (M, 1, D)."""
        m, length, d = x.shape
        hd = d // self.num_heads
        q = self.q(x[:, :1]).reshape(m, 1, self.num_heads, hd).transpose(1, 2)
        kv = self.kv(x).reshape(m, length, 2, self.num_heads, hd).permute(2, 0, 3, 1, 4)
        mask = None if key_mask is None else key_mask[:, None, None, :]
        out = attention(q, kv[0], kv[1], mask)
        return self.proj(out.transpose(1, 2).reshape(m, 1, d))


class AggregationBlock(nn.Module):
    """norm1 -> class attention -> residual on the query; norm2 -> MLP -> residual."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = ClassAttention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = MLP(dim, int(dim * mlp_ratio))


class LocalAggregationHead(nn.Module):
    """The DMT-JEPA head; ``targets`` (target mode) and ``context`` (context mode) share its weights.

    Args:
        dim, num_heads: the encoder's width and heads.
        grid: token grid (rows, cols).
        window: neighbourhood side (odd); k: neighbours aggregated per patch; depth: blocks.
    """

    def __init__(self, dim: int, num_heads: int, grid: Sequence[int], window: int = 3, k: int = 4, depth: int = 2):
        super().__init__()
        if not 1 <= k <= window * window - 1:
            raise ValueError(f"k must be in [1, {window * window - 1}] for window {window}, got {k}")
        self.grid, self.window, self.k = tuple(grid), window, k
        self.blocks = nn.ModuleList(AggregationBlock(dim, num_heads) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        cand, valid = window_candidates(self.grid, window)
        self.register_buffer("cand", cand, persistent=False)
        self.register_buffer("valid", valid, persistent=False)
        self.apply(_init)

    def targets(self, h: torch.Tensor) -> torch.Tensor:
        """(B, N, D) layer-normed target features -> (B, N, D) aggregated targets."""
        b, n, d = h.shape
        idx, ok = select_neighbours(h, self.cand, self.valid, self.k)
        nbrs = torch.gather(h, 1, idx.reshape(b, n * idx.shape[-1], 1).expand(-1, -1, d)).reshape(b * n, -1, d)
        query = h.mean(dim=1, keepdim=True).repeat_interleave(n, dim=0)  # patch (b, n) -> image b's mean
        mask = torch.cat([torch.ones(b * n, 1, dtype=torch.bool, device=h.device), ok.reshape(b * n, -1)], dim=1)
        for blk in self.blocks:
            x = torch.cat([query, nbrs], dim=1)
            query = query + blk.attn(blk.norm1(x), mask)
            query = query + blk.mlp(blk.norm2(query))
        return self.norm(query).reshape(b, n, d)

    def context(self, z: torch.Tensor) -> torch.Tensor:
        """(M, K, D) context tokens -> (M, K, D): a learned summary added to every token."""
        for blk in self.blocks:
            x = torch.cat([z.mean(dim=1, keepdim=True), z], dim=1)
            z = z + blk.attn(blk.norm1(x))
            z = z + blk.mlp(blk.norm2(z))
        return self.norm(z)


def _init(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


class DMTJEPA(JEPA):
    """I-JEPA plus the aggregation head (context mode, trained) and its EMA (target mode)."""

    extra_modules = ("head", "target_head")

    def __init__(
        self,
        encoder: VisionTransformer,
        predictor: VisionTransformerPredictor,
        *,
        window: int = 3,
        k: int = 4,
        depth: int = 2,
        target_encoder: VisionTransformer | None = None,
    ):
        super().__init__(encoder, predictor, target_encoder)
        self.head = LocalAggregationHead(encoder.embed_dim, encoder.num_heads, encoder.grid_size, window, k, depth)
        self.target_head = copy.deepcopy(self.head)
        self.target_head.requires_grad_(False)

    @torch.no_grad()
    def targets(self, imgs, masks_pred, nenc):
        h = self.target_encoder(imgs)
        h = self.target_head.targets(F.layer_norm(h, (h.size(-1),)))
        return repeat_interleave_batch(apply_masks(h, masks_pred), imgs.size(0), repeat=nenc)

    def context(self, imgs, masks_enc):
        return self.head.context(self.encoder(imgs, masks_enc))

    @torch.no_grad()
    def update_target(self, momentum: float) -> None:
        super().update_target(momentum)
        tgt = list(self.target_head.parameters())
        torch._foreach_mul_(tgt, momentum)
        torch._foreach_add_(tgt, [p.detach() for p in self.head.parameters()], alpha=1.0 - momentum)

    def param_groups(self) -> list[dict]:
        """Upstream's four groups, then the head's weights and its biases / 1-D params (as DMT-JEPA adds)."""
        groups = super().param_groups()
        params = list(self.head.named_parameters())
        groups.append({"params": [p for n, p in params if "bias" not in n and p.ndim != 1], "WD_exclude": False})
        groups.append(
            {"params": [p for n, p in params if "bias" in n or p.ndim == 1], "WD_exclude": True, "weight_decay": 0.0}
        )
        return groups
