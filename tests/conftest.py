"""Shared fixtures: tiny models and deterministic batches that run in milliseconds on a CPU."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")

from ijepa.masks import MultiBlockMaskCollator
from ijepa.pretrain import ModelSpec, OptimSpec

TINY = ModelSpec(name="vit_tiny", patch_size=4, img_size=32, pred_depth=2, pred_emb_dim=48, overrides={"depth": 2})


def tiny_collator(batch: int = 4) -> MultiBlockMaskCollator:
    return MultiBlockMaskCollator(
        32, 4, enc_mask_scale=(0.85, 1.0), pred_mask_scale=(0.15, 0.2), aspect_ratio=(0.75, 1.5), npred=4, min_keep=4
    )


def step_batches(collator: MultiBlockMaskCollator, batch: int = 4, size: int = 32):
    """``make_batches`` for ``pretrain``: images and masks are pure functions of the global step."""

    def make(epoch: int, start: int):
        step = start
        while True:
            g = torch.Generator().manual_seed(1000 + step)
            yield (torch.randn(batch, 3, size, size, generator=g), *collator.sample(batch, step))
            step += 1

    return make


# The longest files first, in this order, so that `make test`'s two pytest-xdist workers (--dist loadfile, files in
# collection order) start them at once and finish together; the other files follow in their own order.
LONGEST_FIRST = ("test_pipeline.py", "test_papers_path.py", "test_errors.py", "test_distributed.py")


def pytest_collection_modifyitems(session, config, items):
    def rank(item) -> int:
        name = item.path.name
        return LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)  # stable: each file's tests keep their order


@pytest.fixture
def tiny_spec() -> ModelSpec:
    return TINY


@pytest.fixture
def tiny_optim() -> OptimSpec:
    return OptimSpec(epochs=3, warmup=1, start_lr=2e-4, lr=1e-3, bf16=False)
