"""The attentive probe (V-JEPA's frozen evaluation): a learned query cross-attends to every patch token of a
frozen encoder, then a linear head classifies the pooled vector.

The pooler is V-JEPA's ``AttentiveClassifier`` with one query and depth 1: ``q = query + xattn(query,
norm1(tokens))``, ``q = q + mlp(norm2(q))``, ``logits = linear(q)`` (qkv biases, MLP ratio 4). With a single
query the cross-attention is computed in an equivalent, cheaper order: the key projection is folded into the
query (``q_h . (W_k x + b_k) = (W_k^T q_h) . x + const``; the constant cancels in the softmax) and the value
projection is applied after pooling (the attention weights sum to 1), so the (L, D) x (D, 2D) projections of
every token are never formed; and ``norm1``'s standardisation, which has no parameters, is computed once for
frozen tokens, its affine part folded into the query and the pooled vector. ``tests/test_eval.py`` checks
it against the direct computation.

Average pooling weighs every patch alike and underrates features that hold their information in a few tokens;
the attentive probe learns which tokens to read. It trains on cached float16 tokens (``extract.tokens``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import DataError
from ..schedules import warmup_cosine
from .linear import topk_correct

EPS = 1e-6  # norm1's epsilon
EVAL_CHUNK = 1024  # cached tokens scored at once on val and test (bounds memory; hits are summed over chunks)


class AttentiveProbe(nn.Module):
    """One learned query, one cross-attention block (``num_heads`` heads), a linear classifier."""

    def __init__(self, dim: int, num_classes: int, num_heads: int = 4, mlp_ratio: float = 4.0):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"token width {dim} is not divisible by {num_heads} heads")
        self.dim, self.num_heads = dim, num_heads
        self.query = nn.Parameter(torch.zeros(1, dim))
        nn.init.trunc_normal_(self.query, std=0.02)
        self.norm1 = nn.LayerNorm(dim, eps=EPS)
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
        self.head = nn.Linear(dim, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def attention_weights(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, L, D) tokens -> (B, heads, L) attention of the query over them."""
        h, dh, d = self.num_heads, self.dim // self.num_heads, self.dim
        q = self.q(self.query).view(h, dh) * dh**-0.5
        k = self.kv(self.norm1(tokens))[..., :d].unflatten(-1, (h, dh))  # (B, L, H, dh), the direct way
        return torch.einsum("hj,blhj->bhl", q, k).softmax(dim=-1)

    def standardise(self, tokens: torch.Tensor) -> torch.Tensor:
        """``norm1`` without its affine part: what ``forward(..., standardised=True)`` takes. It has no
        parameters, so frozen tokens can be standardised once instead of at every step."""
        return F.layer_norm(tokens.float(), (self.dim,), eps=self.norm1.eps)

    def pooled(self, tokens: torch.Tensor, standardised: bool = False) -> torch.Tensor:
        """(B, L, D) -> (B, D): the query after the cross-attention block."""
        h, dh, d = self.num_heads, self.dim // self.num_heads, self.dim
        z = tokens.float() if standardised else self.standardise(tokens)
        gamma, beta = self.norm1.weight, self.norm1.bias  # norm1(x) = gamma * z + beta
        q = self.q(self.query).view(h, dh) * dh**-0.5
        u = torch.einsum("hj,hjd->hd", q, self.kv.weight[:d].view(h, dh, d))  # W_k folded into the query
        attn = torch.einsum("bld,hd->bhl", z, u * gamma).softmax(dim=-1)  # beta . u: the same for every token
        mixed = torch.einsum("bhl,bld->bhd", attn, z) * gamma + beta  # attention-weighted norm1(tokens)
        v = torch.einsum("bhd,hjd->bhj", mixed, self.kv.weight[d:].view(h, dh, d)) + self.kv.bias[d:].view(h, dh)
        out = self.query + self.proj(v.reshape(len(tokens), d))
        return out + self.mlp(self.norm2(out))

    def forward(self, tokens: torch.Tensor, standardised: bool = False) -> torch.Tensor:
        """(B, L, D) tokens (or ``standardise(tokens)`` with ``standardised``) -> (B, C) logits."""
        return self.head(self.pooled(tokens, standardised))


def heads_for(dim: int, wanted: int) -> int:
    """The most heads <= ``wanted`` that divide ``dim`` (raw-pixel tokens are 3 p^2 wide)."""
    return max(h for h in range(1, wanted + 1) if dim % h == 0)


def new_probe(
    dim: int, num_classes: int, heads: int, lr: float, weight_decay: float, seed: int, device: torch.device
) -> tuple[AttentiveProbe, torch.optim.AdamW]:
    """A probe initialised from ``seed`` (the same for every lr) and its AdamW (no decay on biases, norms and
    the query)."""
    torch.manual_seed(seed)
    probe = AttentiveProbe(dim, num_classes, heads).to(device)
    decay = [p for name, p in probe.named_parameters() if p.ndim > 1 and name != "query"]
    rest = [p for name, p in probe.named_parameters() if not (p.ndim > 1 and name != "query")]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}], lr=lr
    )
    return probe, opt


def step_probes(
    probes: Sequence, lrs: Sequence[float], tokens: torch.Tensor, y: torch.Tensor, scale: float, average_gradients=None
) -> None:
    """One AdamW step of every (probe, optimiser) at its lr x ``scale`` on the same standardised tokens;
    ``average_gradients(params)`` (distributed) runs between the backward pass and the step."""
    for (probe, opt), lr in zip(probes, lrs, strict=True):
        for group in opt.param_groups:
            group["lr"] = lr * scale
        loss = F.cross_entropy(probe(tokens, standardised=True), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if average_gradients is not None:
            average_gradients(list(probe.parameters()))
        opt.step()


@torch.no_grad()
def count_hits(probes: Sequence, tokens: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """(len(probes), 2) float64 top-1 and top-5 hits of every probe on one batch of standardised tokens."""
    rows = []
    for probe, _ in probes:
        probe.eval()
        hit = topk_correct(probe(tokens, standardised=True), y)
        rows.append([hit[1], hit[5]])
    return torch.tensor(rows, dtype=torch.float64)


def best_of(lrs: Sequence[float], hits: Mapping[str, tuple[float, torch.Tensor]], heads: int) -> dict:
    """The probe result from each split's (images, ``count_hits`` summed): a row per lr, and the row with the
    best val top-1 (the smaller lr on a tie)."""
    table = []
    for i, lr in enumerate(lrs):
        row = {"head": f"attentive_lr{lr:g}", "lr": lr}
        for split, (n, counts) in hits.items():
            top1, top5 = counts[i].tolist()
            row |= {f"{split}_top1": top1 / n, f"{split}_top5": top5 / n}
        table.append(row)
    best = max(table, key=lambda r: (r["val_top1"], -r["lr"]))
    out = {"best": best["head"], "table": table, "val_top1": best["val_top1"], "num_heads": heads}
    if "test_top1" in best:
        out |= {"test_top1": best["test_top1"], "test_top5": best["test_top5"]}
    return out


def train_attentive_probe(
    tokens: Mapping[str, torch.Tensor],
    labels: Mapping[str, torch.Tensor],
    *,
    num_classes: int,
    lrs: Sequence[float],
    num_heads: int = 4,
    epochs: int = 10,
    batch_size: int = 256,
    weight_decay: float = 0.01,
    warmup_epochs: float = 1.0,
    seed: int = 0,
    device: torch.device | None = None,
    progress=None,
) -> dict:
    """Train one probe per lr on ``train`` tokens, pick the best by ``val`` top-1, report it on ``test``.
    Every probe sees the same batches in the same order (one permutation per epoch from ``seed``).

    AdamW with linear warmup then cosine decay to 0 (V-JEPA's probe optimiser), cross-entropy; the tokens are
    standardised once (``AttentiveProbe.standardise``) into float32.

    Args:
        tokens: split -> (N, L, D) tokens; splits "train", "val" and optionally "test".
        labels: split -> (N,) class indices.
        num_classes: C. lrs: one probe per learning rate. num_heads: at most this many heads (``heads_for``).
        epochs, batch_size, weight_decay, warmup_epochs: the optimisation, shared by every probe.
        seed: initialisation and shuffling (the same for every lr).
        progress: called with the epoch after each epoch of every lr's probe (e.g. a progress bar).
    Returns:
        {"best": name, "table": [row per lr with val/test top-1/top-5], "val_top1", "test_top1", "test_top5",
        "num_heads"}.
    """
    if "train" not in tokens or "val" not in tokens:
        raise DataError(
            "the attentive probe needs 'train' and 'val' tokens (val picks the lr; test is only reported): rerun "
            "prepare with prepare.val_fraction > 0, then extract"
        )
    device = device or torch.device("cpu")
    splits = [s for s in ("train", "val", "test") if s in tokens]
    dim = tokens["train"].shape[-1]
    heads = heads_for(dim, num_heads)
    n = len(labels["train"])
    steps_per_epoch = max(1, math.ceil(n / batch_size))
    total, warmup = epochs * steps_per_epoch, round(warmup_epochs * steps_per_epoch)
    # norm1 without its affine part, once per split, in float32 (twice the cache's memory, no per-step casts)
    z = {s: _standardised(tokens[s], dim) for s in splits}
    probes = [new_probe(dim, num_classes, heads, lr, weight_decay, seed, device) for lr in lrs]
    g = torch.Generator().manual_seed(seed)
    step = 0
    for epoch in range(epochs):
        for probe, _ in probes:
            probe.train()
        perm = torch.randperm(n, generator=g)
        for i in range(steps_per_epoch):
            idx = perm[i * batch_size : (i + 1) * batch_size]
            if len(idx) < 2:
                continue
            scale = warmup_cosine(step + 1, warmup=warmup, total=total, ref=1.0)
            step_probes(probes, lrs, z["train"][idx].to(device), labels["train"][idx].to(device), scale)
            step += 1
        if progress is not None:
            progress(epoch)
    hits = {}
    for split in splits[1:]:
        counts = torch.zeros(len(lrs), 2, dtype=torch.float64)
        for lo in range(0, len(z[split]), EVAL_CHUNK):
            y = labels[split][lo : lo + EVAL_CHUNK].to(device)
            counts += count_hits(probes, z[split][lo : lo + EVAL_CHUNK].to(device), y)
        hits[split] = (len(z[split]), counts)
    return best_of(lrs, hits, heads)


def _standardised(tokens: torch.Tensor, dim: int, chunk: int = 4096) -> torch.Tensor:
    return torch.cat(
        [F.layer_norm(tokens[i : i + chunk].float(), (dim,), eps=EPS) for i in range(0, len(tokens), chunk)]
    )
