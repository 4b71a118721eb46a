"""The attentive probe at scale: patch tokens computed on the fly by the frozen encoders, never cached.

At ImageNet scale the token cache that ``train_attentive_probe`` reads does not fit (256 x 1280 float16 values
per image for ViT-H/14: 840 GB for the train split). Here every training batch goes once through each frozen
encoder (bf16 autocast where the device computes it), and the tokens feed every probe of every learning rate
at once: the encoders run once per batch and epoch, whatever the number of lrs. The probes, their
initialisation (one seed for every lr), AdamW and the warmup + cosine schedule are ``train_attentive_probe``'s;
the tokens are rounded to float16 as the cache stores them. What differs is the order of the training
images (the loader's stream instead of a permutation of the cache), so the two paths agree within noise,
not to the bit.

Distributed: each rank trains on its share of every global batch; the probes' gradients are averaged over
ranks before each step (every rank then holds the same probes), and evaluation counts are summed.
Resumable: after every epoch the probes and optimisers go to ``state`` (the same object the finetuning and
segmentation loops take: ``pipeline.resume.EpochState`` keys it by everything that fixes the run and sets a
state of other params aside); a rerun continues from the last finished epoch, bit-exact on the CPU, since every
epoch's stream is fixed by (seed, epoch, rank).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ..device import autocast
from ..distributed import all_reduce_sum
from ..epochs import EpochLoop
from ..models.vit import VisionTransformer
from ..schedules import warmup_cosine
from .attentive import EPS, best_of, count_hits, heads_for, new_probe, step_probes
from .features import pixel_tokens, pooled_features


@torch.no_grad()
def batch_tokens(
    encoders: Mapping[str, VisionTransformer | None], x: torch.Tensor, patch_size: int, device, bf16: bool
) -> dict[str, torch.Tensor]:
    """Normalised images (B, 3, H, W) -> name -> standardised float32 tokens (B, L, D): an encoder's last
    layer (rounded to float16, as the cache keeps them), or for ``None`` the pixels' p x p patches."""
    raw = {}
    with autocast(device, bf16):  # the encoders' pass; the standardisation below in float32, as the cache's
        for name, enc in encoders.items():
            raw[name] = pixel_tokens(x, patch_size) if enc is None else pooled_features(enc, x, tokens=True)["tokens"]
    return {name: F.layer_norm(t.float(), (t.shape[-1],), eps=EPS) for name, t in raw.items()}


def _average_gradients(params: Sequence[torch.Tensor]) -> None:
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return
    grads = [p.grad for p in params if p.grad is not None]  # the same parameters on every rank (one graph)
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


def train_attentive_probes_streaming(
    encoders: Mapping[str, VisionTransformer | None],
    *,
    train_batches: Callable[[int], Iterable],
    eval_batches: Callable[[str], Iterable],
    eval_splits: Sequence[str],
    prepare: Callable[[torch.Tensor], torch.Tensor],
    num_classes: int,
    lrs: Sequence[float],
    steps_per_epoch: int,
    num_heads: int = 4,
    epochs: int = 10,
    weight_decay: float = 0.01,
    warmup_epochs: float = 1.0,
    seed: int = 0,
    device: torch.device | None = None,
    bf16: bool = False,
    state=None,
    should_stop: Callable[[], bool] = lambda: False,
    progress: Callable[[int], None] | None = None,
) -> dict[str, dict] | None:
    """Train one attentive probe per (encoder, lr) on tokens computed batch by batch; pick each encoder's
    best lr by ``val`` top-1 and report it on the other splits.

    Args:
        encoders: name -> frozen encoder in eval mode on ``device``, or None for the raw pixels' patches (at
            the patch size of the first encoder).
        train_batches: epoch -> this rank's ``steps_per_epoch`` batches ``(images, labels)`` as a loader gives
            them (``ijepa.data.pretrain_loader`` with ``collator=None`` and an eval transform).
        eval_batches: split -> this rank's share ``(images, labels, keys)`` (``ijepa.data.eval_loader``).
        eval_splits: "val" first, then e.g. "test".
        prepare: loader images -> normalised model input on ``device``.
        num_classes, lrs, num_heads, epochs, weight_decay, warmup_epochs, seed: as ``train_attentive_probe``.
        bf16: bf16 autocast for the encoders.
        state: where the probes are saved after every epoch and resumed from (``load() -> dict | None``,
            ``save(dict)``; ``pipeline.resume.EpochState``), or None.
        should_stop: asked after every epoch (agreed across ranks); True saves, then returns None.
        progress: called with the number of steps done after each step.
    Returns:
        name -> ``train_attentive_probe``'s result, or None when stopped by ``should_stop``.
    """
    device = device or torch.device("cpu")
    patch = next(e.patch_size for e in encoders.values() if e is not None)
    dims = {n: 3 * patch * patch if e is None else e.embed_dim for n, e in encoders.items()}
    heads = {n: heads_for(d, num_heads) for n, d in dims.items()}
    probes = {
        n: [new_probe(dims[n], num_classes, heads[n], lr, weight_decay, seed, device) for lr in lrs] for n in encoders
    }
    total, warmup = epochs * steps_per_epoch, round(warmup_epochs * steps_per_epoch)
    loop = EpochLoop(epochs, state, should_stop, rng=False)  # each epoch's stream is fixed by (seed, epoch, rank)
    _restore(probes, loop.saved)
    step = loop.start * steps_per_epoch
    for epoch in loop:
        for name_probes in probes.values():
            for probe, _ in name_probes:
                probe.train()
        for images, labels in train_batches(epoch):
            tokens = batch_tokens(encoders, prepare(images), patch, device, bf16)
            y = torch.as_tensor(labels).to(device)
            scale = warmup_cosine(step + 1, warmup=warmup, total=total, ref=1.0)
            for name, name_probes in probes.items():
                step_probes(name_probes, lrs, tokens[name], y, scale, _average_gradients)
            step += 1
            if progress is not None:
                progress(step)
        if step != (epoch + 1) * steps_per_epoch:
            raise RuntimeError(f"epoch {epoch} gave {step - epoch * steps_per_epoch} batches, not {steps_per_epoch}")
        loop.end(epoch, {"probes": {n: [(p.state_dict(), o.state_dict()) for p, o in v] for n, v in probes.items()}})
    if loop.stopped:
        return None
    hits = _evaluate(probes, encoders, eval_batches, eval_splits, prepare, patch, device, bf16)
    return {name: best_of(lrs, {s: (hits[s]["n"], hits[s][name]) for s in eval_splits}, heads[name]) for name in probes}


@torch.no_grad()
def _evaluate(probes, encoders, eval_batches, splits, prepare, patch, device, bf16) -> dict[str, dict]:
    """split -> {"n": images over all ranks, name: (lrs, 2) top-1 and top-5 hits over all ranks}: one pass
    over each split's batches, every encoder's tokens computed once for all its probes."""
    out = {}
    for split in splits:
        counts = {n: torch.zeros(len(v), 2, dtype=torch.float64) for n, v in probes.items()}
        seen = 0
        for images, labels, _keys in eval_batches(split):
            tokens = batch_tokens(encoders, prepare(images), patch, device, bf16)
            y = torch.as_tensor(labels).to(device)
            seen += len(y)
            for name, name_probes in probes.items():
                counts[name] += count_hits(name_probes, tokens[name], y)
        local = torch.cat([torch.tensor([float(seen)]), *[c.flatten() for c in counts.values()]])
        totals = all_reduce_sum(local.to(device)).cpu()  # on the device: NCCL reduces CUDA tensors only
        result, offset = {"n": totals[0].item()}, 1
        for name, c in counts.items():
            result[name] = totals[offset : offset + c.numel()].view_as(c)
            offset += c.numel()
        if not result["n"]:
            raise ValueError(f"the {split} split gave no image to evaluate the attentive probes on")
        out[split] = result
    return out


def _restore(probes: dict, state: dict | None) -> None:
    """Load the probes and optimisers of a saved state (nothing without one)."""
    if state is None:
        return
    for name, saved in state["probes"].items():
        for (probe, opt), (p_state, o_state) in zip(probes[name], saved, strict=True):
            probe.load_state_dict(p_state)
            opt.load_state_dict(o_state)
