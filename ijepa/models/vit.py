"""Vision Transformer encoder and I-JEPA predictor with the official parameter names.

Parameter names and registration order equal the official state dicts (``patch_embed.proj``,
``pos_embed``, ``blocks.N.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}``, ``norm``; ``predictor_embed``,
``mask_token``, ``predictor_pos_embed``, ``predictor_blocks.N...``, ``predictor_norm``, ``predictor_proj``),
so official weights load strictly and optimizer states line up index by index.

Differences from upstream, all deliberate:
- attention runs through ``F.scaled_dot_product_attention`` (same maths, fused kernels) on accelerators; on
  the CPU it is written out (softmax(q k^T / sqrt(d)) v), which PyTorch's CPU flash kernel is far slower than
  for short token sequences (its bf16 backward alone was 40% of a demo training step:
  ``benchmarks/bench_pretrain_step.py`` prints both);
- under bf16 autocast the residual stream stays float32, as upstream's does: positional embeddings and the
  mask token are added in float32 (the bf16 patch embedding is promoted), never cast down to bf16 first;
- the encoder accepts any input size whose sides the patch size divides: the positional table is
  resampled bicubically (upstream crashes there, issue #42); non-square inputs are allowed;
- initialisation is what upstream *effectively* uses: ``helper.init_model`` re-initialises every Linear
  and LayerNorm after construction, which undoes the depth rescaling of ``fix_init_weight``, so every
  Linear/Conv2d weight and the mask token are N(0, 0.02) (truncated at +-2 absolute) with zero biases.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .pos_embed import resample_pos_embed, sincos_2d

Size2 = int | tuple[int, int] | Sequence[int]


def to_2tuple(size: Size2) -> tuple[int, int]:
    """An int or a pair -> (rows, cols)."""
    if isinstance(size, int):
        return size, size
    size = tuple(int(s) for s in size)
    if len(size) == 1:
        return size[0], size[0]
    if len(size) != 2:
        raise ValueError(f"expected an int or a (height, width) pair, got {size}")
    return size  # type: ignore[return-value]


def apply_masks(x: torch.Tensor, masks: Sequence[torch.Tensor]) -> torch.Tensor:
    """Keep the tokens each mask lists, stacking masks along the batch (mask-major).

    Args:
        x: (B, N, D) tokens.
        masks: list of M LongTensors (B, K) of token indices.
    Returns:
        (M * B, K, D); row ``m * B + b`` holds image b under mask m.
    """
    out = []
    for m in masks:
        idx = m.unsqueeze(-1).expand(-1, -1, x.size(-1))
        out.append(torch.gather(x, 1, idx))
    return torch.cat(out, dim=0)


def repeat_interleave_batch(x: torch.Tensor, batch_size: int, repeat: int) -> torch.Tensor:
    """Split x into chunks of ``batch_size`` rows and repeat each chunk ``repeat`` times in place.

    ``[c0, c1] -> [c0, c0, ..., c1, c1, ...]``, as upstream's helper of the same name.
    """
    n = x.size(0) // batch_size
    chunks = x.reshape(n, batch_size, *x.shape[1:])
    return chunks.repeat_interleave(repeat, dim=0).reshape(n * repeat * batch_size, *x.shape[1:])


class DropPath(nn.Module):
    """Stochastic depth per sample; identity at rate 0 or in eval mode (uses no RNG then)."""

    def __init__(self, drop_prob: float = 0.0):
        super().__init__()
        self.drop_prob = float(drop_prob)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1.0 - self.drop_prob
        shape = (x.shape[0],) + (1,) * (x.ndim - 1)
        mask = x.new_empty(shape).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob}"


class MLP(nn.Module):
    """fc1 -> exact GELU -> fc2."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Attention(nn.Module):
    """Multi-head self-attention; ``qkv`` rows are [q; k; v] with heads contiguous, as upstream."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed dim {dim} is not divisible by {num_heads} heads")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        x = attention(qkv[0], qkv[1], qkv[2])
        return self.proj(x.transpose(1, 2).reshape(b, n, c))


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v for (B, heads, N, d) tensors; ``mask`` (broadcastable to the scores,
    True = attend) as ``scaled_dot_product_attention``'s boolean ``attn_mask``.

    Fused ``scaled_dot_product_attention`` on accelerators; written out on the CPU, where the fused kernel's
    backward is several times slower for the short sequences of small images (the same maths either way).
    """
    if q.device.type != "cpu":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    scores = (q * q.size(-1) ** -0.5) @ k.transpose(-2, -1)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return scores.softmax(dim=-1) @ v


class Block(nn.Module):
    """Pre-norm transformer block with stochastic depth."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True, drop_path: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads, qkv_bias)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = MLP(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PatchEmbed(nn.Module):
    """Non-overlapping patches: Conv2d(in_chans, D, p, stride p), flattened row-major to (B, N, D)."""

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, (nn.Linear, nn.Conv2d)):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def _drop_path_rates(rate: float, depth: int) -> list[float]:
    return [rate * i / max(depth - 1, 1) for i in range(depth)]


class VisionTransformer(nn.Module):
    """ViT encoder without class token or head; returns all patch tokens after the final LayerNorm.

    Args:
        img_size: construction resolution (int or (H, W)); sets the stored positional table.
        patch_size: patch side p; both sides of img_size must be multiples of it.
        in_chans: input channels (3 for RGB; grey inputs are replicated to 3 by the data loaders).
        embed_dim, depth, num_heads, mlp_ratio, qkv_bias: architecture.
        drop_path_rate: stochastic depth, linearly increasing over blocks (0 for pretraining).
    """

    def __init__(
        self,
        img_size: Size2 = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_path_rate: float = 0.0,
    ):
        super().__init__()
        self.img_size = to_2tuple(img_size)
        self.patch_size = int(patch_size)
        self.grid_size = _grid(self.img_size, self.patch_size)
        self.in_chans = in_chans
        self.embed_dim = embed_dim
        self.depth = depth
        self.num_heads = num_heads
        self.mlp_ratio = mlp_ratio
        self.patch_embed = PatchEmbed(self.patch_size, in_chans, embed_dim)
        n = self.grid_size[0] * self.grid_size[1]
        self.pos_embed = nn.Parameter(torch.zeros(1, n, embed_dim), requires_grad=False)
        rates = _drop_path_rates(drop_path_rate, depth)
        self.blocks = nn.ModuleList(Block(embed_dim, num_heads, mlp_ratio, qkv_bias, rates[i]) for i in range(depth))
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.pos_embed.data.copy_(sincos_2d(embed_dim, self.grid_size).unsqueeze(0))
        self.apply(_init_weights)

    @property
    def num_patches(self) -> int:
        return self.grid_size[0] * self.grid_size[1]

    def grid_for(self, height: int, width: int) -> tuple[int, int]:
        """The token grid of an (height, width) input; an error if p does not divide both sides."""
        return _grid((height, width), self.patch_size)

    def prepare_tokens(
        self, x: torch.Tensor, masks: Sequence[torch.Tensor] | torch.Tensor | None = None
    ) -> torch.Tensor:
        """Patch-embed, add (resampled) positions and keep the masked tokens.

        Args:
            x: (B, C, H, W) images.
            masks: None, a (B, K) LongTensor, or a list of them (stacked along the batch).
        Returns:
            (B, N, D) tokens, or (len(masks) * B, K, D) with masks.
        """
        grid = self.grid_for(x.shape[-2], x.shape[-1])
        x = self.patch_embed(x)
        # float32 positions promote a bf16 patch embedding: the residual stream stays fp32 under autocast
        x = x + resample_pos_embed(self.pos_embed, self.grid_size, grid)
        if masks is not None:
            x = apply_masks(x, [masks] if isinstance(masks, torch.Tensor) else masks)
        return x

    def forward(self, x: torch.Tensor, masks: Sequence[torch.Tensor] | torch.Tensor | None = None) -> torch.Tensor:
        """(B, C, H, W) images -> (B, N, D) normed tokens ((len(masks) * B, K, D) with masks)."""
        x = self.prepare_tokens(x, masks)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)

    def get_intermediate_layers(
        self, x: torch.Tensor, n: int | Sequence[int] = 1, norm: bool = True
    ) -> list[torch.Tensor]:
        """Outputs of chosen blocks, for probes and dense heads.

        Args:
            x: (B, C, H, W) images.
            n: the last n blocks (int) or explicit block indices (negative allowed).
            norm: apply the final LayerNorm to each output (the last one then equals ``forward``).
        Returns:
            list of (B, N, D), in block order.
        """
        wanted = list(range(self.depth - n, self.depth)) if isinstance(n, int) else [i % self.depth for i in n]
        if not wanted or min(wanted) < 0:
            raise ValueError(f"cannot take {n} layers from a {self.depth}-block encoder")
        x = self.prepare_tokens(x)
        outs = []
        for i, blk in enumerate(self.blocks):
            x = blk(x)
            if i in wanted:
                outs.append(self.norm(x) if norm else x)
            if i >= max(wanted):
                break
        return outs

    def arch(self) -> dict:
        """The numbers that rebuild this encoder (stored in checkpoints)."""
        return {
            "embed_dim": self.embed_dim,
            "depth": self.depth,
            "num_heads": self.num_heads,
            "mlp_ratio": self.mlp_ratio,
            "patch_size": self.patch_size,
            "img_size": list(self.img_size),
            "in_chans": self.in_chans,
        }


def random_like(encoder: VisionTransformer, seed: int) -> VisionTransformer:
    """The random-init baseline of every comparison (probes, finetuning, segmentation): ``encoder``'s architecture
    with weights drawn from ``seed``, the global generator left as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return VisionTransformer(**encoder.arch())


class VisionTransformerPredictor(nn.Module):
    """I-JEPA predictor: maps context tokens plus mask tokens at target positions to target features.

    Args:
        grid_size: token grid (rows, cols) of the encoder input.
        embed_dim: encoder width D (input and output).
        predictor_embed_dim: predictor width Dp.
        depth, num_heads, mlp_ratio, qkv_bias: predictor blocks (upstream uses the encoder's head count).
    """

    def __init__(
        self,
        grid_size: Size2,
        embed_dim: int = 768,
        predictor_embed_dim: int = 384,
        depth: int = 6,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
    ):
        super().__init__()
        self.grid_size = to_2tuple(grid_size)
        self.embed_dim = embed_dim
        self.predictor_embed_dim = predictor_embed_dim
        self.depth = depth
        self.num_heads = num_heads
        self.mlp_ratio = mlp_ratio
        self.predictor_embed = nn.Linear(embed_dim, predictor_embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, predictor_embed_dim))
        n = self.grid_size[0] * self.grid_size[1]
        self.predictor_pos_embed = nn.Parameter(torch.zeros(1, n, predictor_embed_dim), requires_grad=False)
        self.predictor_blocks = nn.ModuleList(
            Block(predictor_embed_dim, num_heads, mlp_ratio, qkv_bias) for _ in range(depth)
        )
        self.predictor_norm = nn.LayerNorm(predictor_embed_dim, eps=1e-6)
        self.predictor_proj = nn.Linear(predictor_embed_dim, embed_dim)
        self.predictor_pos_embed.data.copy_(sincos_2d(predictor_embed_dim, self.grid_size).unsqueeze(0))
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        self.apply(_init_weights)

    def forward(self, x: torch.Tensor, masks_x: Sequence[torch.Tensor], masks: Sequence[torch.Tensor]) -> torch.Tensor:
        """Predict target tokens.

        Args:
            x: (nenc * B, K_enc, D) context tokens from the encoder.
            masks_x: nenc LongTensors (B, K_enc), the context indices.
            masks: npred LongTensors (B, K_pred), the target indices.
        Returns:
            (npred * nenc * B, K_pred, D); row ``i_pred * nenc * B + j_enc * B + b``.
        """
        batch = x.size(0) // len(masks_x)
        x = self.predictor_embed(x)
        pos = self.predictor_pos_embed.expand(batch, -1, -1)  # fp32: keeps the residual stream fp32 under autocast
        x = x + apply_masks(pos, masks_x)
        n_ctx = x.size(1)
        pos_t = repeat_interleave_batch(apply_masks(pos, masks), batch, repeat=len(masks_x))
        pred = self.mask_token + pos_t
        x = torch.cat([x.repeat(len(masks), 1, 1), pred], dim=1)
        for blk in self.predictor_blocks:
            x = blk(x)
        x = self.predictor_norm(x)
        return self.predictor_proj(x[:, n_ctx:])

    def arch(self) -> dict:
        """The numbers that rebuild this predictor (stored in checkpoints)."""
        return {
            "grid_size": list(self.grid_size),
            "embed_dim": self.embed_dim,
            "predictor_embed_dim": self.predictor_embed_dim,
            "depth": self.depth,
            "num_heads": self.num_heads,
            "mlp_ratio": self.mlp_ratio,
        }


def _grid(img_size: tuple[int, int], patch_size: int) -> tuple[int, int]:
    h, w = img_size
    if patch_size <= 0 or h % patch_size or w % patch_size:
        raise ValueError(f"image size {h}x{w} is not divisible by patch size {patch_size}")
    return h // patch_size, w // patch_size
