"""Fixed 2-D sin-cos positional embeddings with the official I-JEPA channel order, and resampling.

Channel layout (official, inherited from MAE): the first half of the channels encodes the *column* (x)
index and the second half the *row* (y) index; each half is ``[sin(pos * omega), cos(pos * omega)]`` with
``omega = 1 / 10000 ** (arange(D/4) / (D/4))``. Tokens are in row-major order. The values are computed in
float64 and cast to float32, as upstream does, so official checkpoints match to the last bit.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F


def _sincos_1d(dim: int, pos: np.ndarray) -> np.ndarray:
    """(M,) positions -> (M, dim) embedding: all sines, then all cosines."""
    if dim % 2:
        raise ValueError(f"1-D sin-cos embedding needs an even dimension, got {dim}")
    omega = np.arange(dim // 2, dtype=np.float64) / (dim / 2.0)
    omega = 1.0 / 10000**omega
    out = np.einsum("m,d->md", pos.reshape(-1).astype(np.float64), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def sincos_2d(embed_dim: int, grid_size: int | tuple[int, int]) -> torch.Tensor:
    """Official 2-D sin-cos table.

    Args:
        embed_dim: channels D (a multiple of 4).
        grid_size: G or (rows, cols).
    Returns:
        float32 tensor (rows * cols, D), row-major tokens; channels [0, D/2) encode the column index.
    """
    if embed_dim % 4:
        raise ValueError(f"2-D sin-cos embedding needs embed_dim divisible by 4, got {embed_dim}")
    rows, cols = (grid_size, grid_size) if isinstance(grid_size, int) else grid_size
    # meshgrid(w, h): grid[0] holds the column coordinate, grid[1] the row coordinate.
    col, row = np.meshgrid(np.arange(cols, dtype=np.float64), np.arange(rows, dtype=np.float64))
    emb = np.concatenate([_sincos_1d(embed_dim // 2, col), _sincos_1d(embed_dim // 2, row)], axis=1)
    return torch.from_numpy(emb).float()


def resample_pos_embed(pos_embed: torch.Tensor, old_grid: tuple[int, int], new_grid: tuple[int, int]) -> torch.Tensor:
    """Bicubically resample a (1, N, D) patch-position table to another grid (no class token).

    The official ``interpolate_pos_encoding`` assumes a class token and crashes on any other resolution
    (upstream issue #42); here every token is a patch token.

    Args:
        pos_embed: (1, old_rows * old_cols, D).
        old_grid: (rows, cols) the table was made for.
        new_grid: (rows, cols) wanted.
    Returns:
        (1, new_rows * new_cols, D) in the input's dtype.
    """
    if tuple(old_grid) == tuple(new_grid):
        return pos_embed
    n_old = old_grid[0] * old_grid[1]
    if pos_embed.shape[1] != n_old:
        raise ValueError(f"pos_embed has {pos_embed.shape[1]} tokens, grid {old_grid} needs {n_old}")
    dim = pos_embed.shape[-1]
    grid = pos_embed.reshape(1, old_grid[0], old_grid[1], dim).permute(0, 3, 1, 2).float()
    grid = F.interpolate(grid, size=tuple(new_grid), mode="bicubic", align_corners=False)
    return grid.permute(0, 2, 3, 1).reshape(1, new_grid[0] * new_grid[1], dim).to(pos_embed.dtype)


def square_grid(num_tokens: int) -> tuple[int, int]:
    """The (G, G) grid of a square token count, or an error when it is not a square."""
    g = math.isqrt(num_tokens)
    if g * g != num_tokens:
        raise ValueError(f"{num_tokens} tokens do not form a square grid; pass the grid explicitly")
    return g, g
