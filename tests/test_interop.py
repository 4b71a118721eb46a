"""timm and Hugging Face layouts, both ways, against the real timm and transformers classes built locally from
small configs (no download): outputs equal in fp32 within 1e-5; ViT-H/14's name mapping on the meta device."""

from __future__ import annotations

import json

import pytest
import torch

from ijepa import create_encoder, load_encoder
from ijepa.checkpoint import CheckpointError
from ijepa.interop import detect_layout, export_encoder, hf_to_ijepa, ijepa_to_hf

timm = pytest.importorskip("timm")
transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

TOL = 1e-5


def ours(depth=2, img=32, patch=8):
    torch.manual_seed(0)
    enc = create_encoder("vit_tiny", patch_size=patch, img_size=img, depth=depth).eval()
    with torch.no_grad():  # non-trivial norms and biases, so a swapped name shows
        for p in enc.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return enc


def images(n=3, img=32):
    return torch.randn(n, 3, img, img, generator=torch.Generator().manual_seed(1))


def timm_vit(depth=2, img=32, patch=8):
    return timm.models.VisionTransformer(
        img_size=img,
        patch_size=patch,
        embed_dim=192,
        depth=depth,
        num_heads=3,
        class_token=False,
        global_pool="avg",
        fc_norm=False,
        num_classes=0,
    ).eval()  # fmt: skip  (the layout of vit_huge_patch14_gap_224 and the other I-JEPA models in timm)


def hf_vit(depth=2, img=32, patch=8):
    config = transformers.IJepaConfig(
        hidden_size=192, num_hidden_layers=depth, num_attention_heads=3, intermediate_size=768, image_size=img,
        patch_size=patch, layer_norm_eps=1e-6,
    )  # fmt: skip
    torch.manual_seed(2)
    return transformers.IJepaModel(config).eval()


def close(a, b):
    return (a - b).abs().max().item()


def test_timm_both_ways(tmp_path):
    enc, x = ours(), images()
    with torch.no_grad():
        want = enc(x)
    # ours -> timm: the exported folder loads strictly into timm's class and gives our outputs
    export_encoder(enc, tmp_path / "timm", "timm")
    config = json.loads((tmp_path / "timm/config.json").read_text())
    model = timm.models.VisionTransformer(**config["model_args"]).eval()
    model.load_state_dict(safetensors_torch.load_file(tmp_path / "timm/model.safetensors"), strict=True)
    with torch.no_grad():
        assert close(model.forward_features(x), want) <= TOL
        assert close(model(x), want.mean(1)) <= TOL  # timm's average pooling = our avg_last feature
    # timm -> ours: a timm model's own state dict (safetensors, and torch) loads with our outputs
    t = timm_vit()
    safetensors_torch.save_file(t.state_dict(), tmp_path / "timm.safetensors")
    torch.save(t.state_dict(), tmp_path / "timm.pth")
    with torch.no_grad():
        ref = t.forward_features(x)
        for path in (tmp_path / "timm.safetensors", tmp_path / "timm.pth"):
            assert close(load_encoder(path, num_heads=3)(x), ref) <= TOL
        assert close(load_encoder(tmp_path / "timm", num_heads=None)(x), want) <= TOL  # heads from config.json


def test_hugging_face_both_ways(tmp_path):
    enc, x = ours(), images()
    with torch.no_grad():
        want = enc(x)
    export_encoder(enc, tmp_path / "hf", "hf")
    model = transformers.IJepaModel.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        assert close(model(pixel_values=x).last_hidden_state, want) <= TOL
    # transformers' own weights, saved by save_pretrained, and as a bare state dict of its module names
    h = hf_vit()
    h.save_pretrained(tmp_path / "saved")
    torch.save(h.state_dict(), tmp_path / "hf_modules.pth")
    with torch.no_grad():
        ref = h(pixel_values=x).last_hidden_state
        assert close(load_encoder(tmp_path / "saved")(x), ref) <= TOL
        assert close(load_encoder(tmp_path / "hf_modules.pth", num_heads=3)(x), ref) <= TOL
    # the Hub's transformers-4 names (what ijepa_to_hf writes) read back to ours exactly
    hub = ijepa_to_hf(enc.state_dict())
    assert "encoder.layer.0.attention.attention.query.weight" in hub and detect_layout(hub) == "hf"
    back = hf_to_ijepa(hub)
    assert back.keys() == enc.state_dict().keys() and all(torch.equal(back[k], v) for k, v in enc.state_dict().items())


def test_export_command_and_strict_names(tmp_path, capsys):
    from ijepa.cli import main

    enc = ours()
    other = {k: v + 1 for k, v in enc.state_dict().items()}  # the context encoder differs: --which matters
    torch.save({"target_encoder": enc.state_dict(), "encoder": other}, tmp_path / "ckpt.pth")
    assert (
        main(
            ["export", str(tmp_path / "ckpt.pth"), "--to", "hf", "--output", str(tmp_path / "out"), "--num-heads", "3"]
        )
        == 0
    )
    assert "IJepaModel.from_pretrained" in capsys.readouterr().out
    x = images()
    with torch.no_grad():
        assert close(load_encoder(tmp_path / "out")(x), enc(x)) <= TOL
    hub = ijepa_to_hf(enc.state_dict())
    hub["encoder.layer.0.attention.attention.rotary.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError, match=r"keys an I-JEPA encoder does not have: .*rotary"):
        hf_to_ijepa(hub)
    del hub["encoder.layer.0.attention.attention.rotary.weight"], hub["encoder.layer.1.attention.attention.key.bias"]
    with pytest.raises(CheckpointError, match=r"layer 1 lacks the k bias"):
        hf_to_ijepa(hub)
    state = enc.state_dict()
    del state["blocks.1.norm2.bias"]
    safetensors_torch.save_file(state, tmp_path / "short.safetensors")
    with pytest.raises(CheckpointError, match=r"missing keys: blocks\.1\.norm2\.bias"):
        load_encoder(tmp_path / "short.safetensors", num_heads=3)


def test_vit_huge_14_names_on_the_meta_device():
    """The released ViT-H/14: every one of its 32 blocks maps to the timm and Hugging Face names and back."""
    with torch.device("meta"):
        enc = create_encoder("vit_huge", patch_size=14, img_size=224)
        t = timm.create_model("vit_huge_patch14_gap_224", pretrained=False, num_classes=0)
        h = transformers.IJepaModel(
            transformers.IJepaConfig(hidden_size=1280, num_hidden_layers=32, num_attention_heads=16,
                                     intermediate_size=5120, image_size=224, patch_size=14)
        )  # fmt: skip
    state = enc.state_dict()
    timm_shapes = {k: tuple(v.shape) for k, v in t.state_dict().items()}
    assert {k: tuple(v.shape) for k, v in state.items()} == timm_shapes  # timm's names are ours
    hub = ijepa_to_hf(state)
    assert len(hub) == len(state) + 2 * 2 * 32  # per block, qkv weight and bias each split in three
    assert {k: tuple(v.shape) for k, v in hf_to_ijepa(hub).items()} == timm_shapes
    assert {k: tuple(v.shape) for k, v in hf_to_ijepa(h.state_dict()).items()} == timm_shapes  # transformers 5
    assert len(h.state_dict()) == len(hub)
