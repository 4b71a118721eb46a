"""The random number generators a training loop draws from, saved and restored with its state: a run resumed
after an epoch draws what the uninterrupted run drew (augmentations in this process, mixup, drop path).

The state holds only tensors and plain values, so ``read_checkpoint`` (weights-only) loads it.
"""

from __future__ import annotations

import random

import numpy as np
import torch


def rng_state() -> dict:
    """Python's, NumPy's and torch's generators (the CPU one and every CUDA device's)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached": float(cached),
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict) -> None:
    """Restore what ``rng_state`` returned."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def every_rank_rng_state() -> list[dict]:
    """``rng_state`` of every rank of the process group (one entry without one): ranks draw differently."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return [rng_state()]
    states = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(states, rng_state())
    return states


def set_this_rank_rng_state(states: list[dict]) -> None:
    """Restore this rank's entry of what ``every_rank_rng_state`` returned."""
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    set_rng_state(states[torch.distributed.get_rank() if distributed else 0])
