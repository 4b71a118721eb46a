"""Objective, schedules, one engine step, non-finite loss, exact resume, device choice."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ijepa import pick_device
from ijepa.device import autocast
from ijepa.engine import NonFiniteLossError, build_optimizer, train_epoch
from ijepa.models import apply_masks, repeat_interleave_batch
from ijepa.pretrain import build_jepa, pretrain
from ijepa.schedules import make_schedules, warmup_cosine

from .conftest import step_batches, tiny_collator


def official_lr(step1, warmup, start, ref, final, t_max):
    """Upstream WarmupCosineSchedule after its ``step1``-th step()."""
    if step1 < warmup:
        return start + step1 / warmup * (ref - start)
    p = (step1 - warmup) / max(1, t_max - warmup)
    return max(final, final + (ref - final) * 0.5 * (1 + math.cos(math.pi * p)))


def test_one_warmup_cosine_serves_every_loops_step_convention():
    """Pretraining passes step + 1, finetuning step (MAE: lr 0 first), probes and segmentation step + 1."""
    steps = np.arange(20)
    ft = warmup_cosine(steps, warmup=4, total=20, ref=1e-3, final=1e-6)
    assert ft[0] == 0.0 and ft[2] == pytest.approx(5e-4) and ft[4] == pytest.approx(1e-3)
    assert np.all(np.diff(ft[4:]) < 0) and ft[-1] > 1e-6 and warmup_cosine(20, warmup=4, total=20, ref=1e-3) == 0.0
    probe = [warmup_cosine(s + 1, warmup=4, total=20, ref=1.0) for s in range(20)]
    assert probe[:4] == [0.25, 0.5, 0.75, 1.0] and probe[-1] == 0.0 and isinstance(probe[0], float)
    assert warmup_cosine(12, warmup=4, total=20, ref=1.0) == pytest.approx(0.5)  # halfway down the cosine
    poly = warmup_cosine(12, warmup=4, total=20, ref=1e-2, final=0.0, power=0.9)
    assert poly == pytest.approx(1e-2 * 0.5**0.9)
    assert warmup_cosine(30, warmup=4, total=20, ref=1e-2, final=1e-4, power=0.9) == pytest.approx(1e-4)
    rising = warmup_cosine(np.arange(1, 11), warmup=0, total=10, ref=0.04, final=0.4)  # upstream's weight decay
    assert np.all(np.diff(rising) > 0) and rising[-1] == pytest.approx(0.4) and rising.max() <= 0.4


def test_schedules_match_upstream_formulas():
    ipe, epochs = 7, 5
    s = make_schedules(
        ipe=ipe,
        epochs=epochs,
        warmup_epochs=2,
        start_lr=2e-4,
        lr=1e-3,
        final_lr=1e-6,
        weight_decay=0.04,
        final_weight_decay=0.4,
        ema=(0.996, 1.0),
        ipe_scale=1.25,
    )
    t_max = int(1.25 * epochs * ipe)
    assert s.total_steps == ipe * epochs
    for i in range(s.total_steps):
        assert s.lr[i] == pytest.approx(official_lr(i + 1, 2 * ipe, 2e-4, 1e-3, 1e-6, t_max))
        wd = 0.4 + (0.04 - 0.4) * 0.5 * (1 + math.cos(math.pi * (i + 1) / t_max))
        assert s.wd[i] == pytest.approx(min(0.4, wd))
        assert s.momentum[i] == pytest.approx(0.996 + i * 0.004 / (ipe * epochs * 1.25))
    assert s.lr[0] == pytest.approx(2e-4 + 8e-4 / 14) and s.momentum[0] == 0.996
    full = make_schedules(
        ipe=4,
        epochs=3,
        warmup_epochs=1,
        start_lr=0,
        lr=1,
        final_lr=0.01,
        weight_decay=0.04,
        final_weight_decay=0.4,
        ema=(0.996, 1.0),
    )
    assert full.lr[-1] == pytest.approx(0.01) and full.wd[-1] == pytest.approx(0.4)
    assert np.all(np.diff(full.wd) >= 0)


def test_ema_momentum_never_passes_its_final_value():
    """With ipe_scale < 1 upstream's momentum rises above 1 (49 of 100 steps here); ours stops at 1."""
    kw = dict(warmup_epochs=1, start_lr=0, lr=1, final_lr=0.01, weight_decay=0.04, final_weight_decay=0.4)
    s = make_schedules(ipe=10, epochs=10, ema=(0.996, 1.0), ipe_scale=0.5, **kw)
    upstream = 0.996 + np.arange(100) * 0.004 / 50
    assert (upstream > 1).sum() == 49
    assert s.momentum.max() == 1.0 and (s.momentum == 1.0).sum() == 50
    assert np.allclose(s.momentum[:50], upstream[:50]) and np.all(np.diff(s.momentum) >= 0)


def test_loss_is_smooth_l1_on_layer_normed_targets(tiny_spec):
    jepa = build_jepa(tiny_spec, seed=0)
    c = tiny_collator()
    x = torch.randn(4, 3, 32, 32)
    enc, pred = c.sample(4, 0)
    out = jepa(x, enc, pred)
    with torch.no_grad():
        h = jepa.target_encoder(x)
        h = repeat_interleave_batch(apply_masks(F.layer_norm(h, (h.size(-1),)), pred), 4, repeat=len(enc))
        z = jepa.predictor(jepa.encoder(x, enc), enc, pred)
        expected = F.smooth_l1_loss(z, h)
    assert out["loss"].item() == pytest.approx(expected.item(), rel=1e-6)
    assert out["pred"].shape == (4 * 4, pred[0].shape[1], 192)


def test_one_engine_step_updates_weights_and_ema(tiny_spec):
    jepa = build_jepa(tiny_spec, seed=0)
    opt = build_optimizer(jepa)
    s = make_schedules(
        ipe=1,
        epochs=1,
        warmup_epochs=0,
        start_lr=1e-3,
        lr=1e-3,
        final_lr=1e-3,
        weight_decay=0.04,
        final_weight_decay=0.04,
        ema=(0.9, 0.9),
    )
    before_enc = jepa.encoder.blocks[0].attn.qkv.weight.detach().clone()
    before_tgt = jepa.target_encoder.blocks[0].attn.qkv.weight.detach().clone()
    logs = []
    step, loss = train_epoch(
        jepa,
        opt,
        s,
        step_batches(tiny_collator())(0, 0),
        epoch=0,
        start_step=0,
        end_step=1,
        device=torch.device("cpu"),
        on_step=logs.append,
    )
    after_enc = jepa.encoder.blocks[0].attn.qkv.weight.detach()
    assert step == 1 and math.isfinite(loss) and logs[0].lr == pytest.approx(1e-3)
    assert not torch.equal(before_enc, after_enc)
    expected_tgt = 0.9 * before_tgt + 0.1 * after_enc
    assert torch.allclose(jepa.target_encoder.blocks[0].attn.qkv.weight, expected_tgt, atol=1e-7)
    assert opt.param_groups[2]["weight_decay"] == 0.0 and opt.param_groups[0]["weight_decay"] == pytest.approx(0.04)
    assert not any(p.requires_grad for p in jepa.target_encoder.parameters())


def test_resume_continues_exactly(tmp_path, tiny_spec, tiny_optim):
    make = step_batches(tiny_collator())
    cpu = torch.device("cpu")
    full = []
    pretrain(
        model=tiny_spec,
        optim=tiny_optim,
        ipe=3,
        batch_size=4,
        make_batches=make,
        out_dir=tmp_path / "a",
        device=cpu,
        on_step=lambda log: full.append(log.loss),
    )
    assert len(full) == 9 and full[-1] < full[0]

    class Killed(Exception):
        pass

    def kill_mid_epoch(epoch, start):
        for i, batch in enumerate(make(epoch, start)):
            if epoch == 1 and i == 1:
                raise Killed  # dies during the second epoch, after the first epoch's checkpoint
            yield batch

    first = []
    with pytest.raises(Killed):
        pretrain(
            model=tiny_spec,
            optim=tiny_optim,
            ipe=3,
            batch_size=4,
            make_batches=kill_mid_epoch,
            out_dir=tmp_path / "b",
            device=cpu,
            on_step=lambda log: first.append(log.loss),
        )
    resumed = []
    result = pretrain(
        model=tiny_spec,
        optim=tiny_optim,
        ipe=3,
        batch_size=4,
        make_batches=make,
        out_dir=tmp_path / "b",
        device=cpu,
        on_step=lambda log: resumed.append((log.step, log.loss)),
    )
    assert [s for s, _ in resumed] == list(range(3, 9))
    assert [v for _, v in resumed] == full[3:]  # bit-identical on CPU
    assert first[:3] == full[:3] and result["step"] == 9


def test_non_finite_loss_stops_and_keeps_last_checkpoint(tmp_path, tiny_spec, tiny_optim):
    make = step_batches(tiny_collator())

    def poisoned(epoch, start):
        for i, (x, enc, pred) in enumerate(make(epoch, start)):
            yield (x * float("nan") if epoch == 1 and i == 1 else x), enc, pred

    latest = tmp_path / "jepa-latest.pth.tar"
    with pytest.raises(NonFiniteLossError, match=r"loss is nan at step 4 .*last checkpoint is kept"):
        pretrain(
            model=tiny_spec,
            optim=tiny_optim,
            ipe=3,
            batch_size=4,
            make_batches=poisoned,
            out_dir=tmp_path,
            device=torch.device("cpu"),
        )
    ckpt = torch.load(latest, weights_only=True)
    assert ckpt["ijepa_meta"]["step"] == 3
    assert all(torch.isfinite(v).all() for v in ckpt["encoder"].values())


def test_pick_device():
    assert pick_device("cpu") == torch.device("cpu")
    with pytest.raises(ValueError, match=r"device must be one of"):
        pick_device("tpu")
    if not torch.cuda.is_available():
        assert pick_device("auto").type in ("cpu", "mps")
        with pytest.raises(RuntimeError, match=r"cuda"):
            pick_device("cuda")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_bf16_step_on_cuda(tiny_spec):
    """A bf16 step on CUDA is finite, its loss within 2% of fp32's on the same weights and batch, and the
    optimizer step leaves finite weights."""
    device = pick_device("cuda")
    jepa = build_jepa(tiny_spec, seed=0).to(device)
    c = tiny_collator()
    enc, pred = c.sample(4, 0)
    imgs = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0)).to(device)
    enc, pred = [m.to(device) for m in enc], [m.to(device) for m in pred]
    with torch.no_grad():
        ref = float(jepa(imgs, enc, pred)["loss"])
    with autocast(device, True):
        out = jepa(imgs, enc, pred)
    assert out["pred"].dtype == torch.bfloat16 and out["loss"].dtype == torch.float32
    assert torch.isfinite(out["loss"]) and abs(float(out["loss"]) - ref) <= 0.02 * abs(ref)
    opt = build_optimizer(jepa)
    for g in opt.param_groups:
        g["lr"] = 1e-3
    out["loss"].backward()
    opt.step()
    jepa.update_target(0.996)
    assert all(torch.isfinite(p).all() for p in jepa.parameters())


def test_cpu_bf16_only_where_the_cpu_computes_it(monkeypatch, capsys):
    """Emulated bf16 is ~100x slower than fp32: autocast stays off on a CPU without native bf16, and says so."""
    from ijepa import device as dev

    cpu = torch.device("cpu")
    for native in (True, False):
        monkeypatch.setattr(dev, "cpu_has_native_bf16", lambda native=native: native)
        dev._warn_emulated_bf16.cache_clear()
        with dev.autocast(cpu, True):
            assert torch.is_autocast_enabled("cpu") is native
        with dev.autocast(cpu, False):
            assert not torch.is_autocast_enabled("cpu")
        assert ("no native bf16" in capsys.readouterr().err) is not native
