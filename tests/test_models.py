"""Encoder/predictor: presets, official names and sizes, equivalence with explicit attention, geometry."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from ijepa import create_encoder, create_predictor, list_models
from ijepa.models import apply_masks, random_like, repeat_interleave_batch, sincos_2d
from ijepa.models.pos_embed import resample_pos_embed

# Official numbers (reference §1.1): encoder params in millions at (patch, img) and state tensor counts.
OFFICIAL = {
    "vit_tiny": (16, 224, 5.52, 149),
    "vit_small": (16, 224, 21.66, 149),
    "vit_base": (16, 224, 85.80, 149),
    "vit_large": (16, 224, 303.30, 293),
    "vit_huge": (14, 224, 630.76, 389),
    "vit_giant": (16, 224, 1011.37, 485),
}
SMALL = ("vit_tiny", "vit_small")


def official_encoder_keys(depth: int) -> list[str]:
    keys = ["pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias"]
    for i in range(depth):
        for sub in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2"):
            keys += [f"blocks.{i}.{sub}.weight", f"blocks.{i}.{sub}.bias"]
    return [*keys, "norm.weight", "norm.bias"]


def official_predictor_keys(depth: int) -> list[str]:
    keys = ["mask_token", "predictor_pos_embed", "predictor_embed.weight", "predictor_embed.bias"]
    for i in range(depth):
        for sub in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2"):
            keys += [f"predictor_blocks.{i}.{sub}.weight", f"predictor_blocks.{i}.{sub}.bias"]
    return [*keys, "predictor_norm.weight", "predictor_norm.bias", "predictor_proj.weight", "predictor_proj.bias"]


def test_registry_lists_all_official_presets():
    assert list_models() == ["vit_tiny", "vit_small", "vit_base", "vit_large", "vit_huge", "vit_giant"]


def test_unknown_name_lists_valid_ones():
    with pytest.raises(ValueError, match=r"unknown model 'vit_mega'.*vit_tiny.*vit_giant"):
        create_encoder("vit_mega")


@pytest.mark.parametrize("name", list(OFFICIAL))
def test_preset_names_shapes_and_sizes(name):
    patch, img, millions, tensors = OFFICIAL[name]
    with torch.device("meta"):
        enc = create_encoder(name, patch_size=patch, img_size=img)
    sd = enc.state_dict()
    assert list(sd) == official_encoder_keys(enc.depth)
    assert len(sd) == tensors
    assert round(sum(p.numel() for p in enc.parameters()) / 1e6, 2) == pytest.approx(millions, abs=0.011)
    n = (img // patch) ** 2
    d = enc.embed_dim
    assert sd["pos_embed"].shape == (1, n, d)
    assert sd["patch_embed.proj.weight"].shape == (d, 3, patch, patch)
    assert sd["blocks.0.attn.qkv.weight"].shape == (3 * d, d)
    hidden = 6144 if name == "vit_giant" else 4 * d
    assert sd["blocks.0.mlp.fc1.weight"].shape == (hidden, d)


@pytest.mark.parametrize(
    ("name", "patch", "img", "depth", "millions", "tensors"),
    [
        ("vit_large", 16, 224, 12, 22.16, 152),
        ("vit_huge", 14, 224, 12, 22.38, 152),
        ("vit_huge", 16, 448, 12, 22.58, 152),
        ("vit_giant", 16, 224, 16, 29.55, 200),
    ],
)
def test_predictor_names_and_sizes(name, patch, img, depth, millions, tensors):
    with torch.device("meta"):
        pred = create_predictor(name, patch_size=patch, img_size=img, depth=depth)
    sd = pred.state_dict()
    assert list(sd) == official_predictor_keys(depth)
    assert len(sd) == tensors
    assert round(sum(p.numel() for p in pred.parameters()) / 1e6, 2) == pytest.approx(millions, abs=0.011)
    assert pred.num_heads == 16  # the encoder's head count, as upstream


@pytest.mark.parametrize("name", SMALL)
def test_small_presets_forward_backward(name):
    enc = create_encoder(name, patch_size=8, img_size=32)
    pred = create_predictor(name, patch_size=8, img_size=32, depth=2)
    x = torch.randn(2, 3, 32, 32)
    masks_enc = [torch.tensor([[0, 1, 2, 5, 6], [3, 4, 8, 9, 10]])]
    masks_pred = [torch.tensor([[12, 13], [14, 15]]), torch.tensor([[7, 11], [11, 15]])]
    out = pred(enc(x, masks_enc), masks_enc, masks_pred)
    assert out.shape == (4, 2, enc.embed_dim)
    out.square().mean().backward()
    assert enc.patch_embed.proj.weight.grad is not None and pred.mask_token.grad is not None
    assert enc.pos_embed.grad is None and not enc.pos_embed.requires_grad


def explicit_encoder_forward(enc, x):
    """Upstream's maths written out: explicit softmax attention, exact GELU, pre-norm blocks."""
    t = enc.patch_embed.proj(x).flatten(2).transpose(1, 2) + enc.pos_embed
    for blk in enc.blocks:
        h = F.layer_norm(t, (t.size(-1),), blk.norm1.weight, blk.norm1.bias, 1e-6)
        b, n, c = h.shape
        nh = blk.attn.num_heads
        qkv = F.linear(h, blk.attn.qkv.weight, blk.attn.qkv.bias).reshape(b, n, 3, nh, c // nh).permute(2, 0, 3, 1, 4)
        attn = (qkv[0] @ qkv[1].transpose(-2, -1) * (c // nh) ** -0.5).softmax(-1)
        t = t + F.linear((attn @ qkv[2]).transpose(1, 2).reshape(b, n, c), blk.attn.proj.weight, blk.attn.proj.bias)
        h = F.layer_norm(t, (c,), blk.norm2.weight, blk.norm2.bias, 1e-6)
        h = F.linear(F.gelu(F.linear(h, blk.mlp.fc1.weight, blk.mlp.fc1.bias)), blk.mlp.fc2.weight, blk.mlp.fc2.bias)
        t = t + h
    return F.layer_norm(t, (t.size(-1),), enc.norm.weight, enc.norm.bias, 1e-6)


@pytest.mark.parametrize("name", SMALL)
def test_sdpa_matches_explicit_attention(name):
    torch.manual_seed(0)
    enc = create_encoder(name, patch_size=8, img_size=32).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert (enc(x) - explicit_encoder_forward(enc, x)).abs().max() <= 1e-5


def test_cpu_attention_matches_fused_sdpa_values_and_gradients():
    from ijepa.models.vit import attention

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(3, 4, 25, 32, generator=g, requires_grad=True) for _ in range(3))
    out = attention(q, k, v)
    ref = F.scaled_dot_product_attention(q, k, v)
    assert (out - ref).abs().max() <= 1e-5
    grads = torch.autograd.grad(out.square().sum(), (q, k, v))
    refs = torch.autograd.grad(ref.square().sum(), (q, k, v))
    assert all((a - b).abs().max() <= 1e-4 for a, b in zip(grads, refs, strict=True))
    mask = torch.rand(3, 1, 1, 25, generator=g) > 0.3  # DMT-JEPA's key mask (True = attend)
    mask[..., 0] = True
    assert (attention(q, k, v, mask) - F.scaled_dot_product_attention(q, k, v, attn_mask=mask)).abs().max() <= 1e-5


def test_bf16_autocast_keeps_the_residual_stream_fp32():
    """As upstream: positions (and the predictor's mask token) are added in fp32, so every block returns fp32
    under CPU bf16 autocast, and the error against fp32 stays at the level of bf16 matmuls alone."""
    torch.manual_seed(0)
    enc = create_encoder("vit_tiny", patch_size=4, img_size=28, depth=6).eval()
    pred = create_predictor("vit_tiny", patch_size=4, img_size=28, predictor_embed_dim=96, depth=4, embed_dim=192)
    x = torch.randn(8, 3, 28, 28)
    ctx_idx, tgt_idx = torch.arange(30).repeat(8, 1), torch.arange(30, 40).repeat(8, 1)
    dtypes = []
    hooks = [
        b.register_forward_hook(lambda m, i, o: dtypes.append(o.dtype)) for b in [*enc.blocks, *pred.predictor_blocks]
    ]
    with torch.no_grad():
        ref_t, ref_p = enc(x), pred(enc(x, [ctx_idx]), [ctx_idx], [tgt_idx])
        dtypes.clear()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            tokens = enc(x)
            p = pred(enc(x, [ctx_idx]), [ctx_idx], [tgt_idx])
    for h in hooks:
        h.remove()
    assert dtypes and set(dtypes) == {torch.float32}
    rel = (tokens.float() - ref_t).norm() / ref_t.norm()
    rel_p = (p.float() - ref_p).norm() / ref_p.norm()
    assert rel < 0.01 and rel_p < 0.01, (float(rel), float(rel_p))


def test_sincos_official_channel_order():
    d, g = 16, 4
    emb = sincos_2d(d, g)
    assert emb.shape == (g * g, d) and emb.dtype == torch.float32
    # token 1 is (row 0, col 1): the column half changes, the row half equals token 0's.
    assert not torch.allclose(emb[1, : d // 2], emb[0, : d // 2])
    assert torch.equal(emb[1, d // 2 :], emb[0, d // 2 :])
    # token g is (row 1, col 0): the reverse.
    assert torch.equal(emb[g, : d // 2], emb[0, : d // 2])
    omega = 1.0 / 10000 ** (torch.arange(d // 4, dtype=torch.float64) / (d / 4))
    row, col = 2, 3
    expected = torch.cat(
        [torch.sin(col * omega), torch.cos(col * omega), torch.sin(row * omega), torch.cos(row * omega)]
    )
    assert torch.allclose(emb[row * g + col].double(), expected, atol=1e-7)


def test_other_resolutions_and_non_square_inputs():
    enc = create_encoder("vit_tiny", patch_size=8, img_size=32, depth=2).eval()
    with torch.no_grad():
        assert enc(torch.randn(1, 3, 64, 64)).shape == (1, 64, 192)  # upstream crashes here (#42)
        assert enc(torch.randn(1, 3, 32, 48)).shape == (1, 24, 192)
    with pytest.raises(ValueError, match="not divisible by patch size 8"):
        enc(torch.randn(1, 3, 30, 32))
    pe = enc.pos_embed
    assert resample_pos_embed(pe, (4, 4), (4, 4)) is pe
    up = resample_pos_embed(pe, (4, 4), (8, 8))
    assert up.shape == (1, 64, 192)
    non_square = create_encoder("vit_tiny", patch_size=8, img_size=(32, 64), depth=1)
    assert non_square.grid_size == (4, 8) and non_square.pos_embed.shape == (1, 32, 192)


def test_intermediate_layers_feature_api():
    enc = create_encoder("vit_tiny", patch_size=8, img_size=32, depth=4).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        outs = enc.get_intermediate_layers(x, n=4)
        assert len(outs) == 4 and all(o.shape == (2, 16, 192) for o in outs)
        assert torch.allclose(outs[-1], enc(x), atol=1e-6)
        raw = enc.get_intermediate_layers(x, n=[0, -1], norm=False)
        assert len(raw) == 2 and not torch.allclose(raw[-1], outs[-1])
    with pytest.raises(ValueError):
        enc.get_intermediate_layers(x, n=5)


def test_predictor_rows_pair_each_image_with_its_own_masks():
    torch.manual_seed(0)
    enc = create_encoder("vit_tiny", patch_size=8, img_size=32, depth=1).eval()
    pred = create_predictor("vit_tiny", patch_size=8, img_size=32, depth=1, predictor_embed_dim=48).eval()
    b, x = 3, torch.randn(3, 3, 32, 32)
    g = torch.Generator().manual_seed(0)
    masks_enc = [torch.stack([torch.randperm(16, generator=g)[:6].sort().values for _ in range(b)]) for _ in range(2)]
    masks_pred = [torch.stack([torch.randperm(16, generator=g)[:3].sort().values for _ in range(b)]) for _ in range(3)]
    with torch.no_grad():
        out = pred(enc(x, masks_enc), masks_enc, masks_pred)
        for i in range(3):
            for j in range(2):
                for k in range(b):
                    me, mp = [masks_enc[j][k : k + 1]], [masks_pred[i][k : k + 1]]
                    single = pred(enc(x[k : k + 1], me), me, mp)[0]
                    assert torch.allclose(out[i * 2 * b + j * b + k], single, atol=1e-5)


def test_mask_helpers():
    x = torch.arange(2 * 5 * 1).float().reshape(2, 5, 1)
    m = [torch.tensor([[0, 4], [1, 2]]), torch.tensor([[3, 3], [0, 0]])]
    out = apply_masks(x, m)
    assert out.squeeze(-1).tolist() == [[0, 4], [6, 7], [3, 3], [5, 5]]
    y = torch.arange(4).reshape(4, 1)  # two chunks of B=2
    assert repeat_interleave_batch(y, 2, repeat=2).squeeze(1).tolist() == [0, 1, 0, 1, 2, 3, 2, 3]


def test_init_matches_upstream_effective_init():
    torch.manual_seed(0)
    enc = create_encoder("vit_small", patch_size=16, img_size=224)
    # upstream's init_model re-initialises Linear layers, undoing the depth rescaling: std stays 0.02.
    assert enc.blocks[11].attn.proj.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert enc.blocks[0].mlp.fc1.bias.abs().sum() == 0 and torch.all(enc.norm.weight == 1)
    assert math.isclose(enc.patch_embed.proj.weight.std().item(), 0.02, rel_tol=0.1)


def test_random_like_is_the_one_random_init_rule():
    """The same architecture, weights fixed by the seed alone, the caller's generator untouched; every random-init
    baseline (frozen features, finetuning, segmentation) draws through it."""
    encoder = create_encoder("vit_tiny", img_size=32, patch_size=8)
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    a, b, c = random_like(encoder, 0), random_like(encoder, 0), random_like(encoder, 1)
    assert torch.equal(torch.rand(3), expected_next)
    assert a.arch() == encoder.arch()
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa) and not torch.equal(
        sa["blocks.0.attn.qkv.weight"], sc["blocks.0.attn.qkv.weight"]
    )
    root = Path(__file__).resolve().parent.parent
    for user in ("ijepa/eval/features.py", "stages/finetune.py", "stages/seg_train.py"):
        assert "random_like(encoder, seed)" in (root / user).read_text(), user
